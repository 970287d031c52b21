"""A front model shipped as a ``torch.export`` program (``.pt2``) or an ONNX model.

The artifact (``artifact.py``) is the search's file: the smallest bytes, but it loads only
with autosqueeze, the user's model factory and, for channel-pruned plans, Torch-Pruning. A
program is the deployed model traced to ATen operations: plain PyTorch runs it with
``torch.export.load(path).module()``, nothing else imported (a library whose output type
the model returns, such as transformers' ``ModelOutput``, must be importable). Its weights
are held as the kernels hold them while they run, so a layer stored at fewer bits than its
kernel uses takes more bytes here; ``export_program`` names each such layer.

An ONNX model (``export_onnx``) is the artifact's weights traced to ONNX operators: each
weight the artifact stores as integers is stored so here too (int8, or int4 at 4 bits and
fewer, with fp16 scales per row or per group) and turned back into floats by a
``DequantizeLinear`` node (an int8 embedding table's rows are gathered first, then
dequantized, so the table stays integers in memory), so ONNX Runtime runs it with no
autosqueeze, torch or factory (any ONNX runtime, unless the export fused attention or norms
into ONNX Runtime's own operators: ``onnx_forms.fuse_for_ort``). A layer on one of ONNX
Runtime's own kernels (``ort_int8_dynamic``, ``ort_int8_static``) runs ONNX Runtime's integer
operators (``onnx_forms``); torch's kernels are not carried, and those layers run their
decoded weights in fp32. ``OnnxModel`` runs each file under the session options that make it
fastest (``onnx_forms.session_entries``), and the export's notes name them.

autosqueeze loads a program only when told to (``evaluate --trust-pickle``):
``torch.export.load`` unpickles parts of the file, so a program is code from whoever made it
(SECURITY.md). An ONNX file is a protobuf with no code in it; ``OnnxModel`` runs one in ONNX
Runtime.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from autosqueeze.artifacts.onnx_forms import (
    STORED_SUFFIX,
    fold_batch_norms,
    fuse_for_ort,
    int4_packed,
    merge_scalings,
    quantize_layers,
    session_entries,
)
from autosqueeze.common.nested import batch_of, leaves, map_leaves, map_tensors, samples_in
from autosqueeze.common.quiet import STDERR, STDOUT, silenced
from autosqueeze.compression.kernels import KERNELS, kernel_for
from autosqueeze.compression.recovery import floating_tensors
from autosqueeze.compression.techniques.base import weighted_parts
from autosqueeze.plans.plan import Plan
from autosqueeze.usercode.metrics import call_arguments, call_model

T = TypeVar("T")


def export_program(model: nn.Module, plan: Plan, example_input: Any, path: Path) -> list[str]:
    """Trace ``model`` (loaded from the plan's artifact, in its execution form) on
    ``example_input`` and write the program to ``path`` (whole or not at all). The batch
    dimension is left free where the model allows it. Returns notes for the user: the
    batch the program takes, and each layer held at more bits than the artifact stores.
    Raises ValueError naming a layer whose kernel cannot be traced."""
    refused = [
        f"layer {name!r} runs {lp.kernel!r}: {why}"
        for name, lp in plan.layers.items()
        if lp.kernel in KERNELS
        and (why := KERNELS[lp.kernel].refuses_export(model.get_submodule(name)))
    ]
    if refused:
        raise ValueError("; ".join(refused) + "; ship the artifact, or a trial without it")
    with _without_cache(model.eval(), example_input) as cache_note:
        program, batch_note = _traced(model, example_input)
    partial = path.with_name(f".{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.pt2")
    try:
        torch.export.save(program, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return [batch_note, *cache_note, *_widened(plan)]


@contextlib.contextmanager
def _without_cache(model: nn.Module, example_input: Any) -> Iterator[list[str]]:
    """A Hugging Face model traced with ``config.use_cache`` off (put back after), and, for a
    decoder whose output held a key/value cache, a note saying it returns none: the cache
    object (DynamicCache) is no pytree, so ``torch.export`` cannot return it. GPT-2, LLaMA,
    BART, ..."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "use_cache", None) is not True:
        yield []
        return
    with torch.no_grad():
        cached = getattr(call_model(model, example_input), "past_key_values", None) is not None
    config.use_cache = False
    try:
        yield ["it runs with use_cache=False: it returns no key/value cache"] if cached else []
    finally:
        config.use_cache = True


def _traced(model: nn.Module, example_input: Any) -> tuple[torch.export.ExportedProgram, str]:
    """The model as a program (see ``_free_or_fixed``), checked to run the example itself."""

    def trace(args: tuple[Any, ...], kwargs: dict[str, Any], shapes: Any) -> Any:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
        if shapes is not None:
            own_args, own_kwargs = call_arguments(example_input)
            program.module()(*own_args, **own_kwargs)  # the example's own batch still runs
        return program

    return _free_or_fixed(trace, example_input, "program")


def _free_or_fixed(trace: Callable[..., T], example_input: Any, what: str) -> tuple[T, str]:
    """``trace(args, kwargs, dynamic_shapes)`` with the batch dimension free and the others
    free where the model allows (on two samples or more: a size of 1 is specialized), else,
    for a model whose code fixes them, at the example's own shapes; and a note saying which."""
    held = samples_in(example_input)
    with torch.no_grad():
        try:
            args, kwargs = call_arguments(batch_of(example_input, max(2, held)))
            traced = trace(args, kwargs, _batch_shapes(args, kwargs, torch.export.Dim.AUTO))
            return traced, f"the {what} takes any batch size"
        except Exception:  # noqa: BLE001 - a model whose code fixes the batch
            args, kwargs = call_arguments(example_input)
            return trace(args, kwargs, None), (
                f"the {what} takes batches of {held}, as the example input"
            )


def _batch_shapes(args: tuple[Any, ...], kwargs: dict[str, Any], free: Any) -> Any:
    """``torch.export``'s ``dynamic_shapes``: every dimension of every tensor left to the
    tracer (``Dim.AUTO``: free where the model's code allows, fixed where it does not), so a
    language model takes any sentence length as well as any batch."""

    def spec(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or not leaf.dim():
            return None
        return dict.fromkeys(range(leaf.dim()), free)

    return map_leaves(spec, kwargs) if kwargs else map_leaves(spec, args)


def _widened(plan: Plan) -> list[str]:
    """Layers the artifact stores at fewer bits than their kernel holds while it runs."""
    notes = []
    for name, lp in sorted(plan.layers.items()):
        kernel = KERNELS.get(lp.kernel)
        if kernel is not None and lp.bits < kernel.weight_bits:
            notes.append(
                f"layer {name!r}: stored at {lp.bits} bits in the artifact, held at "
                f"{kernel.weight_bits} by its {lp.kernel!r} kernel in the program"
            )
    return notes


def export_onnx(
    model: nn.Module,
    plan: Plan,
    integers: dict[str, tuple[torch.Tensor, torch.Tensor, int | None]],
    example_input: Any,
    path: Path,
    calibration: list[Any] | None = None,
) -> list[str]:
    """Trace ``model`` (the artifact loaded as torch's own layers, ``execution_form=False``)
    to ONNX, store each weight of ``integers`` (``artifact.stored_integers``) at its integer
    width, check that ONNX Runtime runs the file and computes what ``model`` does, put the
    layers the plan gives ONNX Runtime's kernels in their integer form (``onnx_forms``;
    static ranges calibrated on ``calibration``, input batches) and write it to ``path``
    (whole or not at all). Returns notes for the user."""
    import onnx

    with _without_cache(model.eval(), example_input) as cache_note:
        proto, batch_note = _onnx_traced(model, example_input)
    in_ort = _in_ort_kernels(model, plan)
    missing = _store_integers(proto, {k: v for k, v in integers.items() if k not in in_ort})
    folded = fold_batch_norms(proto)
    merge_scalings(proto)  # before the quantizers: one quantized input where they share one
    _without_trace_notes(proto)
    onnx.checker.check_model(proto)
    partial = path.with_name(f".{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.onnx")
    try:
        onnx.save_model(proto, partial)
        _check_runs_alike(partial, model, example_input)
        linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        kept = {k: v for k, v in integers.items() if k in linear}  # (out, in), as MatMulNBits
        left_fp32 = quantize_layers(partial, in_ort, calibration or [example_input], kept)
        fused = _fused(partial, example_input)
        options = OnnxModel(partial).entries  # loads: ONNX Runtime takes what it rewrote
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    stored = len(integers) - len(missing) - len(set(in_ort) & set(integers))
    notes = [batch_note, *cache_note]
    if stored:
        notes.append(f"{stored} weights stored as integers (DequantizeLinear)")
    if folded:
        notes.append(f"{folded} BatchNorms folded into the convolutions before them")
    if in_ort:
        notes.append(
            f"{len(in_ort) - len(left_fp32)} weights run ONNX Runtime's integer kernels "
            "(MatMulInteger for ort_int8_dynamic, QDQ for ort_int8_static, MatMulNBits for "
            "ort_int4)"
        )
    if fused:
        notes.append(fused)
    notes.append(f"run it with {_options_text(options)}")
    if missing:  # tied aliases the exporter merged, or weights it folded into others
        notes.append(
            f"kept in fp32, not found as weights in the traced graph: {', '.join(missing)}"
        )
    if left_fp32:
        notes.append(f"left in fp32 by ONNX Runtime's quantizer: {', '.join(left_fp32)}")
    carried = sorted(
        {lp.kernel for lp in plan.layers.values() if "torch" in kernel_for(lp.kernel).runtimes}
        - {"fp32"}
    )
    if carried:
        notes.append(
            f"the kernels {', '.join(carried)} are torch's and not carried: ONNX Runtime runs "
            "those layers' decoded weights in fp32"
        )
    return notes


def _in_ort_kernels(model: nn.Module, plan: Plan) -> dict[str, str]:
    """The weights of layers on ONNX Runtime's kernels: state-dict key -> its quantizer."""
    found = {}
    for name, lp in plan.layers.items():
        kernel = kernel_for(lp.kernel)
        if kernel.ort_quantizer:
            for part_name, part in weighted_parts(model, name):
                if kernel.fits(part, "cpu"):
                    found[f"{part_name}.weight"] = kernel.ort_quantizer
    return found


def _options_text(entries: dict[str, str]) -> str:
    if not entries:
        return "ONNX Runtime's default session options (QDQ fusion on: its integer kernels)"
    return (
        "the session option "
        + ", ".join(f"{k}={v}" for k, v in entries.items())
        + (" (each integer weight dequantized once, at load)")
    )


ONNX_OPSET = 21  # DequantizeLinear with int4 and per-block scales


def export_onnx_as_users_do(model: nn.Module, example_input: Any, path: Path) -> None:
    """Write ``model`` as ``torch.onnx.export`` writes it by default (its graph optimizer on):
    the fp32 file a user hands ONNX Runtime's one-call quantizers (``onnx_forms.one_call``)."""
    import onnx

    with _without_cache(model.eval(), example_input):
        try:
            proto, _ = _onnx_traced(model, example_input, optimize=True)
        except Exception:  # noqa: BLE001 - the optimizer's own failure: the graph as traced
            proto, _ = _onnx_traced(model, example_input)
    onnx.save_model(proto, path)


def onnx_refusal(model: nn.Module, example_input: Any) -> str | None:
    """Why ``model`` cannot ship to ONNX Runtime (None where it can): the exporter refuses
    it (the operator named where the exporter says which), or ONNX Runtime does not compute
    what torch does on the example input. What ``budgets.runtime: auto`` decides by."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="autosqueeze-onnx-") as folder:
        path = Path(folder) / "original.onnx"
        try:
            with _without_cache(model.eval(), example_input):
                proto, _ = _onnx_traced(model, example_input)
            import onnx

            onnx.save_model(proto, path)
        except Exception as exc:  # noqa: BLE001 - the exporter's refusal, told to the user
            return f"torch.onnx.export cannot trace it: {export_failure(exc)}"
        try:
            _check_runs_alike(path, model, example_input)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's refusal or a wrong answer
            return f"ONNX Runtime does not run its export alike: {export_failure(exc)}"
    return None


def export_failure(exc: BaseException) -> str:
    """The line of an exporter's exception a user can act on: the operator with no ONNX
    function where it names one, else the last exception of its summary, else its first
    line (the exporter's message is pages of advice to itself)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    operator = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if operator:
        return f"the operator {operator.group(1)} has no ONNX conversion"
    causes = re.findall(r"<class '[\w.]+\.(\w+)'>: ([^\n]+)", text)
    if causes:
        return f"{causes[0][0]}: {causes[0][1][:300]}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _onnx_traced(model: nn.Module, example_input: Any, optimize: bool = False) -> tuple[Any, str]:
    """The model as ONNX (see ``_free_or_fixed``), by default as the exporter traced it: its
    optimizer folds a Linear's transposed weight into a new, renamed initializer, and the
    export finds each weight by its own name."""

    def trace(args: tuple[Any, ...], kwargs: dict[str, Any], shapes: Any) -> Any:
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs,
            dynamic_shapes=shapes,
            dynamo=True,
            opset_version=ONNX_OPSET,
            optimize=optimize,
            verbose=False,
        )
        if program is None:  # only the legacy exporter (dynamo=False) returns none
            raise RuntimeError("torch.onnx.export returned no ONNX program")
        return program.model_proto

    with silenced(STDOUT), silenced(STDERR), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation notes
        return _free_or_fixed(trace, example_input, "model")


def _store_integers(
    proto: Any, integers: dict[str, tuple[torch.Tensor, torch.Tensor, int | None]]
) -> list[str]:
    """Replace each float initializer the artifact stores as integers by its integers, its
    fp16 scales (cast to fp32, which ONNX Runtime folds at load) and a DequantizeLinear (then
    a Reshape back, for a convolution's kernel): the values are the artifact's own, so the
    weights ONNX computes are the ones torch loads; fp32 scales were 0.73 MB of MiniLM's
    int8 word embeddings in groups of 64.
    Returns the keys it could not find as initializers (they stay fp32)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, missing = [], []
    for key, (q, scale, group_size) in sorted(integers.items()):
        init = initializers.get(key)
        if init is None or list(init.dims) != list(q.shape):
            missing.append(key)
            continue
        rows = q.reshape(q.shape[0], -1)
        width = rows.shape[1]
        narrow = int(rows.abs().max()) <= 7  # fits int4: stored in half the bytes
        values = helper.make_tensor(
            f"{key}{STORED_SUFFIX}",
            TensorProto.INT4 if narrow else TensorProto.INT8,
            list(rows.shape),
            int4_packed(rows) if narrow else numpy_helper.from_array(rows.numpy()).raw_data,
            raw=True,
        )
        per_group = group_size is not None and group_size < width
        scales = scale.half().reshape(rows.shape[0], -1) if per_group else scale.half().flatten()
        attributes = {"axis": 1, "block_size": group_size} if per_group else {"axis": 0}
        readers = [node for node in graph.node if key in node.input]
        if not narrow and q.dim() == 2 and readers and all(_gathers(n, key) for n in readers):
            graph.initializer.remove(init)
            scales = scales.reshape(rows.shape[0], -1)  # a row's scales gathered with it
            graph.initializer.extend(
                [values, numpy_helper.from_array(scales.numpy(), f"{key}::scale")]
            )
            for reader in readers:
                _gather_then_dequantize(graph, reader, key, width // scales.shape[1])
            continue
        flat = key if q.dim() == 2 else f"{key}::2d"
        nodes += [  # the scales as the artifact holds them (fp16), widened once at load
            helper.make_node("Cast", [f"{key}::scale"], [f"{key}::scale32"], to=TensorProto.FLOAT),
            helper.make_node(
                "DequantizeLinear", [values.name, f"{key}::scale32"], [flat], **attributes
            ),
        ]
        graph.initializer.remove(init)
        graph.initializer.extend([values, numpy_helper.from_array(scales.numpy(), f"{key}::scale")])
        if q.dim() != 2:
            shape = numpy_helper.from_array(
                torch.tensor(list(q.shape), dtype=torch.int64).numpy(), f"{key}::shape"
            )
            graph.initializer.append(shape)
            nodes.append(helper.make_node("Reshape", [flat, shape.name], [key]))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return missing


def _gathers(node: Any, key: str) -> bool:
    """Whether ``node`` only gathers rows of the initializer ``key`` (an embedding lookup)."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    inputs = list(node.input)
    return node.op_type == "Gather" and axis == 0 and inputs[0] == key and key not in inputs[1:]


def _gather_then_dequantize(graph: Any, gather: Any, key: str, block: int) -> None:
    """Replace ``gather`` (rows of ``key``) by a gather of the integer rows and of their fp16
    scales, then a DequantizeLinear of those rows alone: an embedding table stays integers
    in memory, whatever the session options (dequantized whole, MiniLM's word embeddings
    took 22 ms a call where QDQ fusion was on)."""
    from onnx import TensorProto, helper

    out, ids = gather.output[0], gather.input[1]
    nodes = [
        helper.make_node("Gather", [f"{key}{STORED_SUFFIX}", ids], [f"{out}::q"], axis=0),
        helper.make_node("Gather", [f"{key}::scale", ids], [f"{out}::scale"], axis=0),
        helper.make_node("Cast", [f"{out}::scale"], [f"{out}::scale32"], to=TensorProto.FLOAT),
        helper.make_node(
            "DequantizeLinear", [f"{out}::q", f"{out}::scale32"], [out], axis=-1, block_size=block
        ),
    ]
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


def _without_trace_notes(proto: Any) -> None:
    """Drop what the exporter notes on each node for debugging (the FX node, the module
    path, the stack trace: the source files' paths on the machine that exported it): 1.0 MB
    of MiniLM's 24.8 MB file, and nothing a shipped file should tell. Also the graph's own
    notes (the traced program's signature and shape ranges), which depend on what the
    process traced before: an LSTM's file measured 3 bytes more in a search than rebuilt
    alone, and the front refused to write."""
    del proto.graph.metadata_props[:]
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _fused(path: Path, example_input: Any) -> str | None:
    """Put the file at ``path`` in ONNX Runtime's fused operators (``onnx_forms.fuse_for_ort``)
    where it then computes what it did; a note naming what was fused, or None (nothing
    fused, or the fused file loaded or computed otherwise: the file stays as it was)."""
    import onnx

    try:
        proto, made = fuse_for_ort(onnx.load(str(path)))
    except Exception:  # noqa: BLE001 - onnxscript's rewriters are not the user's concern
        return None
    if not made:
        return None
    fused = path.with_name(f".fused-{path.name}")
    try:
        onnx.save_model(proto, fused)
        if not _runs_alike(OnnxModel(path), OnnxModel(fused), example_input):
            return None
        os.replace(fused, path)
    except Exception:  # noqa: BLE001 - ONNX Runtime refused the fused graph: keep the plain one
        return None
    finally:
        fused.unlink(missing_ok=True)
    done = ", ".join(f"{n} {op}" for op, n in sorted(made.items()))
    return f"fused into ONNX Runtime's own operators ({done}): the file runs in ONNX Runtime"


def _check_runs_alike(path: Path, model: nn.Module, example_input: Any) -> None:
    """ONNX Runtime loads the file and its outputs match ``model``'s (fp32 rounding apart)."""
    if not _runs_alike(model, OnnxModel(path), example_input):
        raise ValueError("ONNX Runtime's outputs differ from the model's")


def _runs_alike(model: nn.Module, other: nn.Module, example_input: Any) -> bool:
    """Whether ``other`` computes ``model``'s outputs on ``example_input``, fp32 rounding apart."""
    with torch.inference_mode():
        want = floating_tensors(call_model(model, example_input))
        got = floating_tensors(call_model(other, example_input))
    return len(want) == len(got) and all(
        w.shape == g.shape
        and torch.allclose(w, g, rtol=1e-3, atol=1e-4 * (1 + float(w.abs().max())))
        for w, g in zip(want, got, strict=True)
    )


def load_program(path: Path, device: torch.device) -> nn.Module:
    """A ``.pt2`` program (only ever one the caller trusts: ``torch.export.load`` unpickles),
    called like the model. One traced for a fixed batch (``export`` said so in its note) is
    fed larger batches that many samples at a time (``InBatchesOf``)."""
    program = torch.export.load(path)
    user_inputs = set(program.graph_signature.user_inputs)
    firsts = [  # ints where the batch is fixed, symbols where it is free
        node.meta["val"].shape[0]
        for node in program.graph.nodes
        if node.op == "placeholder"
        and node.name in user_inputs
        and isinstance(node.meta.get("val"), torch.Tensor)
        and node.meta["val"].dim()
    ]
    module = program.module().to(device)
    fixed = firsts and all(type(first) is int and first == firsts[0] for first in firsts)
    return InBatchesOf(module, firsts[0]) if fixed else module


class InBatchesOf(nn.Module):
    """A shipped model that takes batches of ``size`` only, called on batches of any size:
    the batch goes through ``size`` samples at a time (the last part filled up with repeats,
    their outputs dropped) and the outputs are joined along the batch. So ``evaluate`` runs
    a program traced for batches of 1 (``budgets.batch_size``) on the metric's batches, and
    times it on batches it takes as they are."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return in_batches_of(self.size, self.model, args, kwargs)


def in_batches_of(size: int, call: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` on ``size`` samples at a time (see ``InBatchesOf``)."""
    given = samples_in((args, kwargs))
    if given == size:
        return call(*args, **kwargs)
    parts = []
    for start in range(0, given, size):
        part_args, part_kwargs = map_tensors(
            functools.partial(_rows, start=start, size=size), (args, kwargs)
        )
        parts.append(call(*part_args, **part_kwargs))
    columns = iter(zip(*(list(leaves(part)) for part in parts), strict=True))
    return map_leaves(lambda _: _joined(next(columns), size, given), parts[0])


def _rows(t: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Rows ``start`` to ``start + size`` of a batched tensor, repeats of the last filling up."""
    if not t.dim():
        return t
    rows = t[start : start + size]
    if rows.shape[0] < size:
        rows = torch.cat([rows, rows[-1:].expand(size - rows.shape[0], *rows.shape[1:])])
    return rows


def _joined(column: tuple[Any, ...], size: int, given: int) -> Any:
    """One output's parts joined along the batch, the filling dropped; an output with no
    batch dimension (a scalar, a non-tensor) as the first part gave it."""
    first = column[0]
    if isinstance(first, torch.Tensor) and first.dim() and first.shape[0] == size:
        return torch.cat(column)[:given]
    return first


class OnnxModel(nn.Module):
    """An ONNX file run in ONNX Runtime, called like the torch model it came from (the same
    positional and keyword inputs; tensors out, one or a tuple), so metrics and timings take
    it as they take the model. ``threads``: ONNX Runtime's intra-op threads (0: its default,
    every core)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        proto = _refuse_external_data(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.entries = session_entries(proto)  # what makes this file fastest (onnx_forms)
        for key, value in self.entries.items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.path = path
        firsts = {i.shape[0] for i in self.session.get_inputs() if i.shape}
        self.held = next(iter(firsts)) if len(firsts) == 1 else None  # a fixed batch, or str

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.held, int):  # exported for a fixed batch: fed that many at a time
            return in_batches_of(self.held, self._run, args, kwargs)
        return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        given = dict(zip(self.inputs, args)) | kwargs
        feed = {
            name: value.detach().cpu().numpy()
            for name, value in given.items()
            if name in self.inputs and isinstance(value, torch.Tensor)
        }
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _refuse_external_data(path: Path) -> Any:
    """An ONNX file can point its tensors at other files by path; one from someone else
    would have ONNX Runtime read whatever it names. autosqueeze writes single files and
    runs only those."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's parse errors vary
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from None
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors]
                graphs += [attribute.g, *attribute.graphs]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"{path}: tensor {tensor.name!r} points at data outside the file")
    return proto


__all__ = ["OnnxModel", "export_failure", "export_onnx", "export_program", "onnx_refusal"]
