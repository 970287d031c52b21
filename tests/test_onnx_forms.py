"""ONNX Runtime's integer kernels as searched execution forms (``ort_int8_dynamic``,
``ort_int8_static``): a plan's layers become ONNX Runtime's integer operators in the export,
each file runs under the session options its content needs, and the forms are offered only
where the model ships to ONNX Runtime."""

from __future__ import annotations

import collections
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, stored_integers
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples.digits import calibration, example_input, pretrained_cnn
from autosqueeze.plans.plan import LayerPlan, Plan

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autosqueeze.artifacts.export import OnnxModel, export_onnx  # noqa: E402 - after the skips
from autosqueeze.artifacts.onnx_forms import DISABLE_QDQ, one_call  # noqa: E402

DIGITS_LAYERS = ["features.0", "features.2", "features.5", "classifier.1", "classifier.3"]


def _exported(model: nn.Module, plan: Plan, x, path: Path, batches=None) -> list[str]:
    """``plan`` applied to ``model``, stored, decoded and exported to ``path``: the
    evaluator's way to the shipped file."""
    target = Target("cpu", x, "onnxruntime", batches)
    data = artifact_bytes(compress(copy.deepcopy(model), plan, target))
    decoded = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
    return export_onnx(decoded, plan, stored_integers(data), x, path, batches)


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _digits_batch() -> torch.Tensor:
    return torch.cat(calibration()[:4])


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_dynamic_int8_runs_matmul_integer_within_its_error(tmp_path, bits):
    """Every Linear of the digits CNN (Gemm in the export: rewritten as MatMul and Add, which
    ONNX Runtime's dynamic quantizer takes) on ``ort_int8_dynamic``: two MatMulInteger, the
    weights int8 per output channel whatever bits the artifact stored, the outputs within
    int8's error of the decoded model's, weight-only storage folded once at load."""
    model, x = pretrained_cnn().eval(), example_input()
    plan = Plan({n: LayerPlan.of(bits=bits, kernel="ort_int8_dynamic") for n in DIGITS_LAYERS})
    notes = _exported(model, plan, x, tmp_path / "d.onnx")
    ops = _ops(tmp_path / "d.onnx")
    assert ops["MatMulInteger"] == 2 and ops["DynamicQuantizeLinear"] == 2
    assert ops["Gemm"] == 0 and ops["Conv"] == 3  # the convolutions have no dynamic kernel
    assert "2 weights run ONNX Runtime's integer kernels" in " ".join(notes)
    shipped = OnnxModel(tmp_path / "d.onnx")
    assert shipped.entries == {DISABLE_QDQ: "1"}  # no QDQ: stored integers fold at load
    batch = _digits_batch()
    target = Target("cpu", x, "onnxruntime")
    decoded = load_artifact(
        artifact_bytes(compress(copy.deepcopy(model), plan, target)),
        copy.deepcopy(model),
        target,
        execution_form=False,
    )
    with torch.no_grad():
        want, got = decoded(batch), shipped(batch)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95


def test_int4_runs_matmul_nbits_within_its_error(tmp_path):
    """The digits CNN's Linears on ``ort_int4``: MatMulNBits (int4 weights in blocks of 32),
    the convolutions untouched, the outputs within int4's error of the decoded model's."""
    model, x = pretrained_cnn().eval(), example_input()
    linears = ["classifier.1", "classifier.3"]
    plan = Plan({n: LayerPlan.of(kernel="ort_int4") for n in linears})
    notes = _exported(model, plan, x, tmp_path / "d.onnx")
    ops = _ops(tmp_path / "d.onnx")
    assert ops["MatMulNBits"] == 2 and ops["Conv"] == 3 and ops["Gemm"] == 0
    assert "2 weights run ONNX Runtime's integer kernels" in " ".join(notes)
    batch = _digits_batch()
    with torch.no_grad():
        want, got = model(batch), OnnxModel(tmp_path / "d.onnx")(batch)
    assert (got - want).abs().max() <= 0.15 * want.abs().max()
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.9


def test_int4_ships_the_artifacts_own_integers(tmp_path):
    """An ``ort_int4`` layer the artifact stores at 4 bits in blocks MatMulNBits takes
    (GPTQ's integers here) ships those integers and scales, not ONNX Runtime's quantizer's
    own rounding: the MatMulNBits weight decodes to the artifact's weight exactly; a layer
    stored at 8 bits is rounded by the quantizer, as before."""
    from onnx import numpy_helper

    model, x = pretrained_cnn().eval(), example_input()
    batches = calibration()
    plan = Plan(
        {
            "classifier.1": LayerPlan.of(bits=4, group_size=32, round_by="gptq", kernel="ort_int4"),
            "classifier.3": LayerPlan.of(bits=8, kernel="ort_int4"),
        }
    )
    _exported(model, plan, x, tmp_path / "d.onnx", batches)
    proto = onnx.load(str(tmp_path / "d.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    target = Target("cpu", x, "onnxruntime", batches)
    data = artifact_bytes(compress(copy.deepcopy(model), plan, target))
    decoded = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
    ours = next(n for n in nbits if n.input[1].startswith("classifier.1.weight"))
    packed = torch.from_numpy(arrays[ours.input[1]]).to(torch.int16)  # (N, blocks, 16)
    values = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1) - 8
    scales = torch.from_numpy(arrays[ours.input[2]]).reshape(packed.shape[0], -1)
    weight = values.float() * scales.repeat_interleave(32, dim=1)
    width = decoded.classifier[1].weight.shape[1]
    assert torch.equal(weight[:, :width], decoded.classifier[1].weight.detach())
    other = next(n for n in nbits if n is not ours)
    assert not other.input[1].endswith("::nbits")  # the quantizer's (block 32, its rounding)


def test_static_int8_is_what_the_one_call_quantizer_makes_of_the_same_layers(tmp_path):
    """Every layer on ``ort_int8_static``: QDQ calibrated on the calibration batches, the
    Relu and pooling between integer layers taken too, so the file holds the operators ONNX
    Runtime's ``quantize_static`` writes for the whole model, runs with QDQ fusion on, and
    classifies as the fp32 model does."""
    model, x = pretrained_cnn().eval(), example_input()
    batches = calibration()
    plan = Plan({n: LayerPlan.of(kernel="ort_int8_static") for n in DIGITS_LAYERS})
    _exported(model, plan, x, tmp_path / "ours.onnx", batches)
    _exported(model, Plan({}), x, tmp_path / "fp32.onnx")
    one_call("quantize_static", tmp_path / "fp32.onnx", tmp_path / "one.onnx", batches)
    ours = _ops(tmp_path / "ours.onnx")
    assert ours == _ops(tmp_path / "one.onnx")
    assert ours["QuantizeLinear"] > 0 and ours["Relu"] == 0  # folded into the conv ranges
    shipped = OnnxModel(tmp_path / "ours.onnx")
    assert shipped.entries == {}  # QDQ fusion on: ONNX Runtime's integer kernels
    batch = _digits_batch()
    with torch.no_grad():
        want, got = model(batch), shipped(batch)
        theirs = OnnxModel(tmp_path / "one.onnx")(batch)
    assert torch.allclose(got, theirs, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95


@pytest.mark.parametrize(
    ("static", "stored", "fused"),
    [("classifier.1", "features.0", True), ("features.0", "classifier.1", False)],
)
def test_a_file_with_weight_only_and_static_layers_runs_as_the_larger_part_needs(
    tmp_path, static, stored, fused
):
    """One layer static, one stored at 4 bits and run in fp32: QDQ fusion stays on where the
    static layer holds more weights (131k against 288), and is turned off where the stored
    one does, whose int4 values would otherwise be dequantized on every call."""
    model, x = pretrained_cnn().eval(), example_input()
    plan = Plan({static: LayerPlan.of(kernel="ort_int8_static"), stored: LayerPlan.of(bits=4)})
    notes = _exported(model, plan, x, tmp_path / "m.onnx", calibration())
    assert OnnxModel(tmp_path / "m.onnx").entries == ({} if fused else {DISABLE_QDQ: "1"})
    assert "1 weights stored as integers" in " ".join(notes)
    stored_types = {
        i.name: i.data_type for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    }
    assert stored_types[f"{stored}.weight::q"] == onnx.TensorProto.INT4


def test_batch_norms_fold_into_convolutions_whatever_their_weights_hold(tmp_path):
    """The residual CNN (10 Conv + BatchNorm) with one convolution's weight stored at 4 bits,
    one on ``ort_int8_static`` and the rest fp32: every BatchNorm folds into its convolution
    (the stored integers unchanged, their scales scaled), the exporter's zero biases are
    gone, and ONNX Runtime computes what the decoded model does."""
    from autosqueeze.examples.residual import pretrained

    model, x = pretrained().eval(), example_input()
    plan = Plan(
        {
            "stage1.0.conv1.0": LayerPlan.of(bits=4),
            "stage2.0.conv2.0": LayerPlan.of(kernel="ort_int8_static"),
        }
    )
    target = Target("cpu", x, "onnxruntime", calibration())
    data = artifact_bytes(compress(copy.deepcopy(model), plan, target))
    decoded = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
    notes = export_onnx(decoded, plan, stored_integers(data), x, tmp_path / "r.onnx", calibration())
    ops = _ops(tmp_path / "r.onnx")
    assert ops["BatchNormalization"] == 0 and ops["Expand"] == 0 and ops["Conv"] == 10
    assert ops["QuantizeLinear"] > 0  # the static layer, in QDQ (fused at load)
    assert "10 BatchNorms folded" in " ".join(notes)
    assert b"stack_trace" not in (tmp_path / "r.onnx").read_bytes()  # no source paths shipped
    initializers = {i.name: i for i in onnx.load(str(tmp_path / "r.onnx")).graph.initializer}
    q, _, _ = stored_integers(data)["stage1.0.conv1.0.weight"]
    stored = initializers["stage1.0.conv1.0.weight::q"]
    assert stored.data_type == onnx.TensorProto.INT4 and list(stored.dims) == [
        q.shape[0],
        q[0].numel(),
    ]
    batch = _digits_batch()
    with torch.no_grad():
        want, got = decoded(batch), OnnxModel(tmp_path / "r.onnx")(batch)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.95


def test_a_batch_norm_that_would_negate_stored_integers_is_left_as_it_is(tmp_path):
    """A negative BatchNorm scale on a convolution whose weight is stored as integers would
    make its dequantization scale negative: that one stays a BatchNorm, and the file still
    computes what torch does; an fp32 convolution takes a negative scale into its weight."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    ).eval()
    for norm in (model[1], model[3]):
        norm.weight.data = torch.tensor([1.5, -0.5, 0.7, -2.0])
        norm.running_mean.data = torch.randn(4)
        norm.running_var.data = torch.rand(4) + 0.5
    x = torch.randn(1, 1, 8, 8)
    plan = Plan({"0": LayerPlan.of(bits=8)})
    notes = _exported(model, plan, x, tmp_path / "n.onnx")
    ops = _ops(tmp_path / "n.onnx")
    assert ops["BatchNormalization"] == 1 and "1 BatchNorms folded" in " ".join(notes)
    with torch.no_grad():
        torch.testing.assert_close(
            OnnxModel(tmp_path / "n.onnx")(x), model(x), atol=0.05, rtol=0.05
        )


def test_muls_of_one_tensor_by_equal_constants_merge_into_one(tmp_path):
    """x times equal constants (an initializer on either side, a Constant node) becomes one
    Mul that every reader shares; a different constant, or another tensor, keeps its own; the
    file computes what it did."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from autosqueeze.artifacts.onnx_forms import merge_scalings

    factor = np.array([1.0, 2.0, 0.5, 4.0], dtype=np.float32)
    initializers = [
        numpy_helper.from_array(factor, "a"),
        numpy_helper.from_array(factor.copy(), "b"),
        numpy_helper.from_array(factor * 2, "c"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(factor)),
        helper.make_node("Mul", ["x", "a"], ["xa"]),
        helper.make_node("Mul", ["b", "x"], ["xb"]),  # the constant first
        helper.make_node("Mul", ["x", "k"], ["xk"]),
        helper.make_node("Mul", ["x", "c"], ["xc"]),  # another constant
        helper.make_node("Mul", ["y", "a"], ["ya"]),  # another tensor
        helper.make_node("Sum", ["xa", "xb", "xk", "xc", "ya"], ["out"]),
    ]
    vector = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in "xy"]
    graph = helper.make_graph(
        nodes,
        "g",
        vector,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = tmp_path / "before.onnx"
    onnx.save(proto, before)
    assert merge_scalings(proto) == 2
    assert [n.op_type for n in proto.graph.node].count("Mul") == 3
    assert {i.name for i in proto.graph.initializer} == {"a", "c"}
    assert list(proto.graph.node[-1].input) == ["xa", "xa", "xa", "xc", "ya"]
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp_path / "after.onnx")
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    want = OnnxModel(before)(x, y)
    assert torch.equal(OnnxModel(tmp_path / "after.onnx")(x, y), want)


def test_dynamic_int8_on_a_transformers_bert(tmp_path):
    """transformers' BertModel: a Linear exported as Transpose and MatMul gets its weight
    folded, so ONNX Runtime's quantizer takes it; only the layers the plan names change."""
    sys.path.insert(0, str(Path(__file__).parent / "zoo"))
    from zoo_models import build_bert

    model = build_bert()
    batch = {
        "input_ids": torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    }
    named = ["encoder.layer.0.intermediate.dense", "encoder.layer.1.output.dense"]
    plan = Plan({n: LayerPlan.of(kernel="ort_int8_dynamic") for n in named})
    _exported(model, plan, batch, tmp_path / "b.onnx")
    assert _ops(tmp_path / "b.onnx")["MatMulInteger"] == 2
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = OnnxModel(tmp_path / "b.onnx")(**batch)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
    assert cosine.min() > 0.99


def test_a_bert_ships_in_onnx_runtimes_fused_operators(tmp_path):
    """transformers' BertModel on ONNX Runtime's dynamic int8 kernels: the file holds its
    attention as MultiHeadAttention and its residual norms as SkipLayerNormalization (no
    Transpose or Softmax left of the attention), still MatMulInteger on every Linear, says
    so in its notes, and computes what the model does; a CNN has nothing to fuse."""
    sys.path.insert(0, str(Path(__file__).parent / "zoo"))
    from zoo_models import build_bert

    model = build_bert()
    batch = {
        "input_ids": torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    }
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = Plan({n: LayerPlan.of(kernel="ort_int8_dynamic") for n in linears})
    notes = _exported(model, plan, batch, tmp_path / "b.onnx")
    ops = _ops(tmp_path / "b.onnx")
    layers = len(model.encoder.layer)
    assert ops["MultiHeadAttention"] == layers and ops["SkipLayerNormalization"] == 2 * layers
    assert ops["Softmax"] == 0 and ops["MatMulInteger"] == len(linears)
    assert any("MultiHeadAttention" in note and "fused" in note for note in notes)
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        got = OnnxModel(tmp_path / "b.onnx")(**batch)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
    assert cosine.min() > 0.99

    cnn = pretrained_cnn()
    notes = _exported(cnn, Plan({}), example_input(), tmp_path / "d.onnx")
    assert not any("fused" in note for note in notes)
    assert not any(node.domain for node in onnx.load(str(tmp_path / "d.onnx")).graph.node)


def test_onnx_runtime_kernels_are_offered_only_where_the_model_ships_there():
    """The same space file: under the torch runtime the ``ort_*`` kernels are left out, under
    onnxruntime torch's own (int8_dynamic, bf16, ...) are, and each layer gets the ONNX
    Runtime forms its type takes (static int8 on a conv, dynamic on a Linear only)."""
    from autosqueeze.searchspace.space import build_space, load_space_file

    spec = load_space_file(Path(__file__).parents[1] / "search_spaces" / "default.yaml")
    model, x = pretrained_cnn().eval(), example_input()
    torch_space = build_space(model, spec, Target("cpu", x))
    ort_space = build_space(model, spec, Target("cpu", x, "onnxruntime", calibration()))

    def kernels(space, layer):
        dist = space.layers[layer].searched.get("kernel")
        return set(dist.choices) if dist is not None else set()

    assert not {k for k in kernels(torch_space, "classifier.1") if k.startswith("ort_")}
    assert kernels(ort_space, "classifier.1") == {
        "fp32",
        "ort_int8_dynamic",
        "ort_int8_static",
        "ort_int4",
    }
    assert kernels(ort_space, "features.0") == {"fp32", "ort_int8_static"}


@pytest.mark.parametrize(
    "values",
    [
        {"bits": 8},
        {"bits": 4},
        {"bits": 6, "prune": 0.5},  # int8 in the file, pruned or not
        {"bits": 32, "cluster": 2},  # shared values: decoded to fp32 there
        {"kernel": "ort_int8_dynamic"},
        {"kernel": "ort_int8_static"},
        {"kernel": "ort_int4"},
        {"bits": 8, "rank": 0.25},
    ],
    ids=str,
)
def test_the_size_model_prices_a_layer_as_its_onnx_file_stores_it(tmp_path, values):
    """What the knapsack of a study shipping to ONNX Runtime believes a layer's plan saves
    (``onnx_layer_bytes``) is what the ONNX file saves, within 3% of the layer's bytes."""
    from autosqueeze.compression.size_model import onnx_layer_bytes

    model, x = pretrained_cnn().eval(), example_input()
    name = "classifier.1"  # 1024 -> 128: most of the model's bytes
    layer = model.get_submodule(name)
    _exported(model, Plan({}), x, tmp_path / "fp32.onnx")
    _exported(model, Plan({name: LayerPlan.of(**values)}), x, tmp_path / "m.onnx", calibration())
    saved = (tmp_path / "fp32.onnx").stat().st_size - (tmp_path / "m.onnx").stat().st_size
    whole = onnx_layer_bytes(layer, {}, None)
    predicted = whole - onnx_layer_bytes(layer, values, None)
    assert abs(saved - predicted) <= 0.03 * whole, (saved, predicted)


def test_the_original_is_timed_as_torch_onnx_export_writes_it(tmp_path):
    """The fp32 file every trial is timed beside (and the one-call quantizers are given) is
    the original as a user exports it, the exporter's optimizer on: BatchNorm folded into the
    convolutions, as the search's own export (unoptimized, each weight under its own name)
    folds them too (``onnx_forms.fold_batch_norms``)."""
    from conftest import study_config, write_yaml

    from autosqueeze.measuring.evaluator import Evaluator
    from autosqueeze.problem.task import load_task
    from autosqueeze.settings.config import load_config

    config = study_config(
        tmp_path,
        model={"factory": "autosqueeze.examples.residual:pretrained"},
        budgets={"runtime": "onnxruntime", "max_size_mb": None},
    )
    task = load_task(load_config(write_yaml(tmp_path / "study.yaml", config)))
    evaluator = Evaluator(task)
    try:
        ops = _ops(evaluator.original_in_ort().path)
        own = _ops(evaluator._exported(evaluator.artifact(Plan({})), "own.onnx").path)
    finally:
        evaluator.close()
    assert ops["BatchNormalization"] == own["BatchNormalization"] == 0
    assert ops["Conv"] == own["Conv"] == 10


def test_int4_conv1d_weights_are_not_taken_as_a_linears(tmp_path):
    """GPT-2's Conv1D stores its weight transposed (inputs x outputs): its integers are left
    to ONNX Runtime's quantizer rather than written as MatMulNBits rows, so a square
    projection (the attention's output here) is not shipped transposed."""
    from conftest import tiny_gpt2

    model, _, ids = tiny_gpt2()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    plan = Plan.uniform(names, bits=4, group_size=16, kernel="ort_int4")
    x = {"input_ids": ids}
    _exported(model, plan, x, tmp_path / "g.onnx")
    assert _ops(tmp_path / "g.onnx")["MatMulNBits"] == len(names)
    target = Target("cpu", x, "onnxruntime")
    data = artifact_bytes(compress(copy.deepcopy(model), plan, target))
    decoded = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
    with torch.no_grad():
        want = decoded(input_ids=ids).last_hidden_state
        got = OnnxModel(tmp_path / "g.onnx")(input_ids=ids)  # the first output alone
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cosine > 0.99


def test_static_int8_leaves_out_a_layer_whose_file_onnx_runtime_cannot_load(tmp_path):
    """Phi-3's fused query-key-value output is sliced; with it quantized statically, ONNX
    Runtime 1.32's optimizer moves a quantize node through the Slice with the wrong type and
    the file does not load. That projection stays fp32 (named among the weights left) and
    every other Linear runs on the integer kernels: the file loads and computes the model."""
    sys.path.insert(0, str(Path(__file__).parent / "zoo"))
    from zoo_models import build_phi3, data_phi3

    model = build_phi3()
    batches = [x for x, _ in data_phi3()]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = Plan({n: LayerPlan.of(kernel="ort_int8_static") for n in linears})
    notes = _exported(model, plan, batches[0], tmp_path / "p.onnx", batches)
    left = next(note for note in notes if "fp32 by ONNX Runtime's quantizer" in note)
    assert left.endswith(
        ": model.layers.0.self_attn.qkv_proj.weight, model.layers.1.self_attn.qkv_proj.weight"
    ), left
    assert _ops(tmp_path / "p.onnx")["QuantizeLinear"] > 0
    with torch.no_grad():
        want = model(**batches[0]).logits
        got = OnnxModel(tmp_path / "p.onnx")(**batches[0])
    got = got[0] if isinstance(got, (tuple, list)) else got  # the logits, first
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
    assert cosine.min() > 0.98
