"""ONNX Runtime's integer execution forms in an exported file, and the session options each
file runs fastest under.

A layer whose plan names one of ONNX Runtime's kernels (``kernels.OrtInt8``:
``ort_int8_dynamic``, ``ort_int8_static``; ``kernels.OrtInt4``: ``ort_int4``) keeps its
decoded weights as fp32 initializers in the export; ``quantize_layers`` then hands exactly
those layers' nodes to ONNX Runtime's own quantizer (``quantize_dynamic``: MatMulInteger;
``quantize_static``: QDQ, calibrated with MinMax on ``CALIBRATION_BATCHES`` batches of
``task.calibration``; ``MatMulNBitsQuantizer``: MatMulNBits), per output channel (int4: per
block), as the one-call quantizers do to a whole model (``one_call``). The file stores those
weights as int8 (or int4), whatever bits the artifact stored them at; but an ``ort_int4``
weight the artifact stores at 4 bits or fewer, in blocks MatMulNBits takes, is written from
the artifact's own integers and scales (``_nbits_from``), so GPTQ's rounding ships.

Which session options make a file fastest depends on what it holds (``session_entries``):
with activations quantized (QDQ), ONNX Runtime must keep its QDQ fusion on, or it runs the
pairs as separate operators (0.7-0.8x fp32 on the digits CNN, against 1.2-1.5x fused); with
weights alone stored as integers (a DequantizeLinear on an initializer), the option
``session.disable_quant_qdq=1`` folds each once at load instead of on every call (4.8x
faster on MiniLM). A file that holds both can have only one: fusion stays on unless the
weight-only integers outnumber the quantized layers' weights, and the layers on the other
side run slower; the search measures what that costs.

Last, ``fuse_for_ort`` rewrites the graph into ONNX Runtime's fused operators where
onnxscript's fusions find them (attention as ``MultiHeadAttention``,
``SkipLayerNormalization``, ``BiasGelu``), which its own graph optimizer does not do on a
torch 2 export: on MiniLM its ``quantize_dynamic`` file runs 30 Transposes, 36 Reshapes and
19 Slices a call that the fused file does not (docs/results.md). Fused operators live in
ONNX Runtime's ``com.microsoft`` domain: a fused file runs in ONNX Runtime, as every file the
search measures there does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from autosqueeze.common.nested import samples_in
from autosqueeze.common.quiet import STDERR, STDOUT, silenced
from autosqueeze.compression.kernels import OrtInt4
from autosqueeze.usercode.metrics import call_arguments

CALIBRATION_BATCHES = 8
"""Batches of ``task.calibration`` (or of the task's data) that calibrate static int8
activations: what ONNX Runtime's examples use; the range MinMax finds settles within them."""

DISABLE_QDQ = "session.disable_quant_qdq"


def session_entries(proto: Any) -> dict[str, str]:
    """The session config entries a file runs fastest under (see the module docstring): QDQ
    fusion on where activations are quantized, unless the weights stored as integers for
    fp32 layers (the export's ``::q`` initializers, dequantized on every call with fusion
    on) outnumber those of the quantized layers: MiniLM with its 11.7M-value embedding
    stored at 4 bits and two Linears static ran 60.7 ms with fusion on, 11.0 ms off."""
    nodes = list(_all_nodes(proto.graph))
    if not any(node.op_type == "QuantizeLinear" for node in nodes):
        return {DISABLE_QDQ: "1"}
    sizes = {init.name: math.prod(init.dims) for init in proto.graph.initializer}
    weight_only = quantized = 0
    for node in nodes:
        if node.op_type == "DequantizeLinear" and node.input[0] in sizes:
            if node.input[0].endswith(STORED_SUFFIX):
                weight_only += sizes[node.input[0]]
            else:
                quantized += sizes[node.input[0]]
    return {DISABLE_QDQ: "1"} if weight_only > quantized else {}


STORED_SUFFIX = "::q"
"""How the export names a weight it stores as integers for an fp32 layer (``export``)."""


def _all_nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                yield from _all_nodes(sub)


FOLD_LIMIT = 64
"""The most values onnxscript's optimizer may fold into one new constant: enough for the
shape arithmetic the fusions need (an attention's scale from its head size), too few to
turn a stored integer weight back into floats."""


FUSED_FROM = frozenset({"Softmax", "LayerNormalization", "Gelu", "Erf"})
"""Operators the fusions rewrite around (attention's softmax, the norms, GELU): a graph with
none of them has nothing to fuse."""


def fuse_for_ort(proto: Any) -> tuple[Any, dict[str, int]]:
    """``proto`` with its constants folded (``FOLD_LIMIT``) and onnxscript's ONNX Runtime
    fusions applied, and the fused operators it gained, by name (empty: nothing fused, and
    ``proto`` is returned as it was). Run after ``quantize_layers``: fused first, an
    attention's three projections would become one ``Attention`` whose weights ONNX
    Runtime's dynamic quantizer leaves in fp32. The caller checks that the fused file
    computes what ``proto`` does."""
    import onnx_ir as ir
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    if not FUSED_FROM & {node.op_type for node in _all_nodes(proto.graph)}:
        return proto, {}  # nothing the fusions start from (a CNN): spare every trial the pass
    with _quiet():
        folded = optimizer.optimize(
            proto, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT
        )
        model, _ = optimize_for_ort(ir.serde.deserialize_model(folded))
    fused = ir.serde.serialize_model(model)
    before, after = _ort_operators(proto), _ort_operators(fused)
    gained = {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}
    return (fused, gained) if gained else (proto, {})


def _ort_operators(proto: Any) -> dict[str, int]:
    """How many of each of ONNX Runtime's own operators (``com.microsoft``) a graph holds."""
    counts: dict[str, int] = {}
    for node in _all_nodes(proto.graph):
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def quantize_layers(
    path: Path,
    weights: dict[str, str],
    calibration: list[Any],
    integers: dict[str, tuple[torch.Tensor, torch.Tensor, int | None]] | None = None,
) -> list[str]:
    """Rewrite the ONNX file at ``path`` in place: the node that multiplies by each weight of
    ``weights`` (initializer name -> ``"int4"``, ``"dynamic"`` or ``"static"``) put in ONNX
    Runtime's integer form by its quantizer. ``calibration``: input batches (a model's positional or
    keyword inputs) for static ranges. An ``"int4"`` weight the artifact stores at 4 bits or
    fewer in blocks MatMulNBits takes (``integers``: a Linear's integers, outputs x inputs,
    scales and group size; a Conv1D's are stored transposed) is
    written from those integers (``_nbits_from``), not rounded again by ONNX Runtime's
    quantizer, so what GPTQ chose ships. Returns the weights ONNX Runtime left in fp32 (a
    node its quantizer does not take), for the user's notes."""
    import onnx

    proto = onnx.load(str(path))
    nodes = _weight_nodes(proto, weights)
    ours = [
        key
        for key, found in (integers or {}).items()
        if weights.get(key) == "int4" and key in nodes and _nbits_from(proto, nodes[key], *found)
    ]
    for key in ours:
        del nodes[key]  # the artifact's own integers: not rounded again
    if ours and not nodes:
        onnx.save_model(proto, str(path))  # else saved below, before the quantizer reads it
    for mode in ("int4", "dynamic", "static"):  # static last: calibration runs the others
        chosen = [node for key, node in nodes.items() if weights[key] == mode]
        if not chosen:
            continue
        onnx.save_model(proto, str(path))
        with _quiet():
            if mode == "int4":
                _quantize_int4(path, chosen)
            elif mode == "dynamic":
                _quantize_dynamic(path, chosen)
            else:
                _quantize_static(path, chosen + _followers(proto, chosen), calibration)
        proto = onnx.load(str(path))
    left = {init.name for init in proto.graph.initializer}
    return sorted(key for key in weights if key in left or f"{key}::t" in left)


def _weight_nodes(proto: Any, weights: dict[str, str]) -> dict[str, str]:
    """Weight key -> the name of the node that multiplies by it, each made a form ONNX
    Runtime's quantizer takes: the weight an initializer input of the node, not the output
    of a Transpose (folded here: the exporter leaves a Linear's ``x @ W.T`` so), and a
    dynamic or int4 layer's Gemm written as MatMul and Add (neither quantizer takes Gemm)."""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for key, mode in weights.items():
        init = initializers.get(key)
        users = consumers.get(key, [])
        if init is None or len(users) != 1:
            continue  # merged with a tied alias, or used twice: left as it is
        node = users[0]
        if node.op_type == "Transpose" and len(consumers.get(node.output[0], [])) == 1:
            array = numpy_helper.to_array(init)
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded = numpy_helper.from_array(array.transpose(perm).copy(), f"{key}::t")
            user = consumers[node.output[0]][0]
            user.input[list(user.input).index(node.output[0])] = folded.name
            graph.node.remove(node)
            graph.initializer.remove(init)
            graph.initializer.append(folded)
            node = user
        if node.op_type == "Gemm" and mode in ("dynamic", "int4"):
            node = _gemm_as_matmul(graph, node, initializers)
        if node is not None and node.op_type in ("MatMul", "Gemm", "Conv"):
            found[key] = node.name
    return found


NBITS_BLOCKS = (16, 32, 64, 128, 256)
"""The block sizes MatMulNBits takes (a power of two, 16 at least)."""


def _nbits_from(
    proto: Any, node_name: str, q: torch.Tensor, scale: torch.Tensor, group_size: int | None
) -> bool:
    """Replace the MatMul ``node_name`` (its weight an initializer, inputs x outputs) by
    ONNX Runtime's ``MatMulNBits`` holding the artifact's own 4-bit integers ``q`` (outputs x
    inputs, in [-8, 7]) and scales (one per ``group_size`` inputs of an output), with
    ``accuracy_level`` 4 as ``OrtInt4`` runs it. False, and nothing changed, where it cannot:
    wider integers, blocks MatMulNBits does not take, or a weight that is not ``q``'s."""
    import numpy
    from onnx import helper, numpy_helper

    graph = proto.graph
    node = next((n for n in graph.node if n.name == node_name), None)
    if node is None or node.op_type != "MatMul" or group_size not in NBITS_BLOCKS:
        return False
    init = next((i for i in graph.initializer if i.name == node.input[1]), None)
    outputs, inputs = q.shape if q.dim() == 2 else (0, 0)
    if init is None or list(init.dims) != [inputs, outputs] or not -8 <= int(q.min()) <= 7:
        return False
    if int(q.max()) > 7 or scale.shape != (outputs, -(-inputs // group_size)):
        return False
    blocks = scale.shape[1]
    padded = torch.full((outputs, blocks * group_size), 8, dtype=torch.int16)
    padded[:, :inputs] = q.to(torch.int16) + 8  # unsigned: MatMulNBits' zero point is 8
    packed = numpy.frombuffer(int4_packed(padded), dtype=numpy.uint8)
    name = node.input[1]
    values = numpy_helper.from_array(
        packed.reshape(outputs, blocks, group_size // 2), f"{name}::nbits"
    )
    scales = numpy_helper.from_array(scale.float().flatten().numpy(), f"{name}::nbits_scale")
    replaced = helper.make_node(
        "MatMulNBits",
        [node.input[0], values.name, scales.name],
        list(node.output),
        node.name,
        domain="com.microsoft",
        K=inputs,
        N=outputs,
        bits=4,
        block_size=group_size,
        accuracy_level=4,
    )
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, replaced)
    graph.initializer.remove(init)
    graph.initializer.extend([values, scales])
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return True


def int4_packed(values: torch.Tensor) -> bytes:
    """int4 values as ONNX stores them raw: two to a byte, the first in the low nibble (as a
    list of ints, ONNX writes one varint each: 1.47x the bytes on a 1024 x 128 weight)."""
    nibbles = (values.flatten().to(torch.int16) & 0x0F).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return (nibbles[0::2] | (nibbles[1::2] << 4)).numpy().tobytes()


def fold_batch_norms(proto: Any) -> int:
    """Fold each inference BatchNormalization into the convolution before it, in place, as
    ``torch.onnx.export``'s optimizer does for the file a user runs: the search exports each
    weight under its own name (unoptimized), and ONNX Runtime's own Conv+BN fusion does not
    take the exporter's computed zero bias, so the residual CNN ran 0.56x the optimized
    file's speed, and a static int8 convolution's output went through BN in fp32. A weight
    stored as integers keeps its integers (its per-channel scales take the factor); a
    convolution's zero bias becomes an initializer or goes. Returns the count folded."""
    from onnx import numpy_helper

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    for conv in [node for node in graph.node if node.op_type == "Conv"]:
        if len(conv.input) > 2 and _zero_fill(conv.input[2], producer):
            del conv.input[2]  # computed on every call, and it reads the weight's shape
    _drop_unused(graph)
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in _all_nodes(graph):
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {out.name for out in graph.output}
    folded = 0
    for conv in [node for node in graph.node if node.op_type == "Conv"]:
        bias = conv.input[2] if len(conv.input) > 2 else ""
        users = consumers.get(conv.output[0], [])
        norm = users[0] if len(users) == 1 and conv.output[0] not in outputs else None
        if norm is None or norm.op_type != "BatchNormalization" or len(norm.output) != 1:
            continue
        parameters = [initializers.get(name) for name in norm.input[1:]]
        if (bias and bias not in initializers) or any(
            p is None or len(consumers[p.name]) != 1 for p in parameters
        ):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(p) for p in parameters if p is not None)
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / (var + epsilon) ** 0.5
        if not _scale_weight(graph, conv.input[1], factor, initializers, producer, consumers):
            continue
        shift = beta - mean * factor
        if bias:
            shift = shift + numpy_helper.to_array(initializers[bias]) * factor
        folded_bias = numpy_helper.from_array(shift.astype(gamma.dtype), f"{norm.output[0]}::bias")
        graph.initializer.append(folded_bias)
        del conv.input[2:]
        conv.input.append(folded_bias.name)
        conv.output[0] = norm.output[0]
        graph.node.remove(norm)
        folded += 1
    _drop_unused(graph)
    return folded


def merge_scalings(proto: Any) -> int:
    """Merge, in place, the Muls that multiply one tensor by equal constants (an initializer or
    a Constant node, same type, shape and values) into the first of them: what reads a
    merged Mul's output reads the kept one's. Smoothed layers that read one tensor share
    their factors (an attention's query, key and value: ``smooth``), each exported as its own
    Mul; left apart, ONNX Runtime's dynamic quantizer quantizes each product on its own, a
    DynamicQuantizeLinear per layer where one serves the three. Returns the count merged."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
    outputs = {out.name for out in graph.output}
    kept: dict[tuple[Any, ...], str] = {}
    renamed: dict[str, str] = {}
    merged = []
    for node in graph.node:  # in order: a Mul's data input is renamed before it is keyed
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        if node.op_type != "Mul" or len(node.input) != 2 or node.output[0] in outputs:
            continue
        for data in (0, 1):
            value = _constant_value(node.input[1 - data], initializers, constants)
            if value is not None:
                break
        else:
            continue
        key = (node.input[data], value.dtype.str, value.shape, value.tobytes())
        if key in kept:
            renamed[node.output[0]] = kept[key]
            merged.append(node)
        else:
            kept[key] = node.output[0]
    if not merged:
        return 0
    for node in merged:
        graph.node.remove(node)
    for node in _all_nodes(graph):  # a subgraph may read an outer name
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    for info in [info for info in graph.value_info if info.name in renamed]:
        graph.value_info.remove(info)
    _drop_unused(graph)
    return len(merged)


SCALING_LIMIT = 1 << 16
"""The most values a constant ``merge_scalings`` compares may hold: a model's width, not a
weight."""


def _constant_value(name: str, initializers: dict[str, Any], constants: dict[str, Any]) -> Any:
    """The array an initializer or a Constant node's ``value`` holds (``SCALING_LIMIT`` values
    at most), else None."""
    from onnx import numpy_helper

    if name in initializers:
        init = initializers[name]
        small = math.prod(init.dims) <= SCALING_LIMIT
        return numpy_helper.to_array(init) if small else None
    node = constants.get(name)
    value = next((a.t for a in node.attribute if a.name == "value"), None) if node else None
    if value is None or math.prod(value.dims) > SCALING_LIMIT:
        return None
    return numpy_helper.to_array(value)


def _zero_fill(name: str, producer: dict[str, Any]) -> bool:
    """Whether ``name`` is the exporter's zero bias: a Constant zero, cast and expanded."""
    from onnx import numpy_helper

    node = producer.get(name)
    while node is not None and node.op_type in ("Expand", "CastLike"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Constant":
        return False
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    return value is not None and not numpy_helper.to_array(value).any()


def _scale_weight(
    graph: Any,
    name: str,
    factor: Any,
    initializers: dict[str, Any],
    producer: dict[str, Any],
    consumers: dict[str, list[Any]],
) -> bool:
    """Multiply output channel c of the convolution weight ``name`` by ``factor[c]``: an fp32
    initializer in place (under its own name, which ``quantize_layers`` looks up), a weight
    stored as integers in its DequantizeLinear's scales, widened to fp32 (a negative factor
    would need its integers negated: left unfolded). False where the weight is neither, or
    shared."""
    from onnx import numpy_helper

    if len(consumers.get(name, [])) != 1:
        return False
    if name in initializers:
        weight = numpy_helper.to_array(initializers[name])
        factor = factor.reshape(-1, *[1] * (weight.ndim - 1))
        _replace(graph, initializers, name, (weight * factor).astype(weight.dtype))
        return True
    node = producer.get(name)
    if node is not None and node.op_type == "Reshape":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or (factor <= 0).any():
        return False
    widened = producer.get(node.input[1])  # the export's fp16 scales, cast to fp32
    scale_name = widened.input[0] if widened is not None and widened.op_type == "Cast" else ""
    if scale_name not in initializers or len(consumers.get(node.input[1], [])) != 1:
        return False
    scale = numpy_helper.to_array(initializers[scale_name]).astype("float32")
    factor = factor.reshape(-1, *[1] * (scale.ndim - 1))
    folded = numpy_helper.from_array((scale * factor).astype("float32"), f"{scale_name}::folded")
    graph.initializer.append(folded)  # fp32: the fold's own rounding stays out of fp16's
    initializers[folded.name] = folded
    node.input[1] = folded.name
    return True


def _replace(graph: Any, initializers: dict[str, Any], name: str, array: Any) -> None:
    from onnx import numpy_helper

    graph.initializer.remove(initializers[name])
    initializers[name] = numpy_helper.from_array(array, name)
    graph.initializer.append(initializers[name])


def _drop_unused(graph: Any) -> None:
    """Remove the nodes whose outputs nothing reads (the zero biases' chains), then the
    initializers nothing reads."""
    outputs = {out.name for out in graph.output}
    while True:
        read = {name for node in _all_nodes(graph) for name in node.input} | outputs
        dead = [node for node in graph.node if not any(out in read for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


FOLLOWERS = frozenset(
    {
        "Relu",
        "Clip",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Flatten",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Transpose",
    }
)
"""Operators that ONNX Runtime's static quantizer also takes when it quantizes a whole model
(``quantize_static``'s default), so that a Relu folds into its convolution's output range
and a pooling or a reshape runs on int8 between two integer layers: each is quantized where
it follows a static layer, alone or through others of these (on the digits CNN, 1.25x fp32
with them, 1.0x without)."""


def _followers(proto: Any, quantized: list[str]) -> list[str]:
    """The ``FOLLOWERS`` nodes whose data input comes from a node in ``quantized``, directly
    or through other followers."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    taken, found = set(quantized), []
    for node in proto.graph.node:  # topological: a follower's producer came first
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type in FOLLOWERS and source is not None and source.name in taken:
            taken.add(node.name)
            found.append(node.name)
    return found


def _gemm_as_matmul(graph: Any, gemm: Any, initializers: dict[str, Any]) -> Any:
    """``Gemm(x, W, b)`` (alpha and beta 1, x untransposed) as ``MatMul(x, W') + b``, W'
    the weight as stored or transposed (``transB``); None where the Gemm is another."""
    from onnx import helper, numpy_helper

    attributes = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0:
        return None
    if attributes.get("beta", 1.0) != 1.0 or gemm.input[1] not in initializers:
        return None
    weight = initializers[gemm.input[1]]
    if attributes.get("transB", 0):
        array = numpy_helper.to_array(weight).T.copy()
        graph.initializer.remove(weight)
        weight = numpy_helper.from_array(array, f"{gemm.input[1]}::t")
        graph.initializer.append(weight)
    index = list(graph.node).index(gemm)
    product = f"{gemm.output[0]}::product" if len(gemm.input) > 2 else gemm.output[0]
    matmul = helper.make_node("MatMul", [gemm.input[0], weight.name], [product], f"{gemm.name}")
    added = []
    if len(gemm.input) > 2 and gemm.input[2]:
        added.append(
            helper.make_node(
                "Add", [product, gemm.input[2]], [gemm.output[0]], f"{gemm.name}::bias"
            )
        )
    graph.node.remove(gemm)
    for offset, node in enumerate([matmul, *added]):
        graph.node.insert(index + offset, node)
    return matmul


def _quantize_dynamic(path: Path, nodes: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        path, path, per_channel=True, weight_type=QuantType.QInt8, nodes_to_quantize=nodes
    )


def _quantize_int4(path: Path, nodes: list[str]) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(path)),
        bits=4,
        block_size=OrtInt4.block,
        is_symmetric=True,
        accuracy_level=4,  # int8 arithmetic on the unpacked weights: the fast path on a CPU
        nodes_to_include=nodes,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)


def _quantize_static(path: Path, nodes: list[str], calibration: list[Any]) -> None:
    """ONNX Runtime's static quantizer on ``nodes``; where the file it writes does not load in
    ONNX Runtime (1.32's graph optimizer moves a quantize node through a Slice or an
    Unsqueeze with the wrong type: Phi-3's sliced fused projection, Mamba), the weight node
    nearest the node it names is left out and the rest quantized again; with none to blame,
    all stay fp32 (the user's notes name the weights left fp32)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    original = path.read_bytes()
    nodes = list(nodes)
    while True:
        quantize_static(
            path,
            path,
            calibration_reader(path, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            nodes_to_quantize=nodes,
            calibrate_method=CalibrationMethod.MinMax,
        )
        failing = _unloadable(path)
        if failing is None:
            return
        culprit = _nearest(original, failing, nodes)
        path.write_bytes(original)
        if culprit is None:  # none to blame: every layer asked for stays fp32
            return
        nodes.remove(culprit)


def _unloadable(path: Path) -> str | None:
    """None where ONNX Runtime loads the file with its default optimizations, else the
    name of the node it failed on (or its message)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - whatever the runtime says is the reason
        found = re.search(r"Node \((\S+)\)", str(exc))
        return found.group(1) if found else str(exc)
    return None


def _nearest(model: bytes, failing: str, nodes: list[str]) -> str | None:
    """The node of ``nodes`` nearest the tensor the quantize node ``failing`` was made for
    (``<tensor>_q``), in the file before quantization: upstream through any nodes between,
    else downstream (a tensor computed from a weight, not from a layer's output)."""
    import onnx

    graph = onnx.load_model_from_string(model).graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    start = failing.removesuffix("_q")
    above = _search(start, lambda t: [producer[t]] if t in producer else [], "input", nodes)
    return above or _search(start, lambda t: consumers.get(t, []), "output", nodes)


def _search(start: str, step: Any, onward: str, wanted: list[str]) -> str | None:
    """Breadth first from tensor ``start``: ``step(tensor)`` gives the nodes next to it, whose
    ``onward`` tensors (inputs or outputs) come next; the first node named in ``wanted``."""
    frontier, seen = [start], set()
    while frontier:
        for node in step(frontier.pop(0)):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.name in wanted:
                return str(node.name)
            frontier += [tensor for tensor in getattr(node, onward) if tensor]
    return None


ONE_CALL = ("quantize_dynamic", "quantize_static")
"""ONNX Runtime's one-call quantizers: what a user who wants a faster model on a CPU runs
instead of a search, and so the baselines of every study that ships there."""


def one_call(name: str, original: Path, output: Path, calibration: list[Any]) -> None:
    """Write ``output``: ONNX Runtime's one-call quantizer ``name`` applied to the original's
    fp32 export as a user would call it (per channel, its other options left as they are;
    static ranges calibrated on ``calibration``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    with _quiet():
        if name == "quantize_dynamic":
            quantize_dynamic(original, output, per_channel=True, weight_type=QuantType.QInt8)
        elif name == "quantize_static":
            quantize_static(
                original, output, calibration_reader(original, calibration), per_channel=True
            )
        else:
            raise ValueError(f"unknown one-call quantizer {name!r} (the known: {ONE_CALL})")


def calibration_reader(path: Path, batches: list[Any]) -> Any:
    """ONNX Runtime's ``CalibrationDataReader`` over the first ``CALIBRATION_BATCHES`` of
    ``batches``, fed by input name (a file exported for a fixed batch fed that many samples
    at a time)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    firsts = {
        i.type.tensor_type.shape.dim[0].dim_value for i in inputs if i.type.tensor_type.shape.dim
    }
    held = next(iter(firsts)) if len(firsts) == 1 else 0

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(
                feed
                for batch in batches[:CALIBRATION_BATCHES]
                for feed in feeds(names, batch, held)
            )

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    return Reader()


def feeds(names: list[str], batch: Any, held: int = 0) -> list[dict[str, Any]]:
    """A model's input batch (as ``metrics.call_arguments`` splits it) as ONNX Runtime feeds
    by input name; ``held`` samples each where the file takes a fixed batch (0: any)."""
    args, kwargs = call_arguments(batch)
    given = dict(zip(names, args)) | kwargs
    tensors = {
        name: value.detach().cpu()
        for name, value in given.items()
        if name in names and isinstance(value, torch.Tensor)
    }
    total = samples_in(tuple(tensors.values())) if held else 0
    if not held or total == held:
        return [{name: t.numpy() for name, t in tensors.items()}]
    return [
        {name: t[start : start + held].numpy() for name, t in tensors.items()}
        for start in range(0, total - held + 1, held)
    ]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs its advice (pre-processing, per-tensor warnings) on
    the root logger and prints shapes: none of it is the user's business here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with silenced(STDOUT), silenced(STDERR):
            yield
    finally:
        root.setLevel(level)


__all__ = [
    "CALIBRATION_BATCHES",
    "calibration_reader",
    "feeds",
    "fold_batch_norms",
    "fuse_for_ort",
    "merge_scalings",
    "quantize_layers",
    "session_entries",
]
