"""``smooth``: activation smoothing (SmoothQuant). The smoothed layer computes what the original
did; beside an int8 kernel that quantizes its input per tensor, outlier channels cost less;
the artifact stores its exponents and reloads it, the ONNX file carries it into ONNX
Runtime's integer kernels; tied layers are not offered it."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import study_config, write_yaml
from safetensors.torch import load as load_tensors
from test_anatomy import TiedLM  # a language model whose head is its embedding
from torch import nn

from autosqueeze import validate
from autosqueeze.artifacts.artifact import (
    artifact_bytes,
    load_artifact,
    read_plan,
    stored_bytes,
    stored_integers,
)
from autosqueeze.compression.techniques import Target, applied, check_plan, compress
from autosqueeze.compression.techniques.smooth import InputScale, smoothing_shifts
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).eval()


def _inputs(seed: int, rows: int = 32) -> torch.Tensor:
    """Gaussian features with three outlier channels, as a transformer's norms give."""
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed))
    x[:, [3, 17, 40]] *= 40.0
    return x


def test_the_smoothed_layer_computes_what_the_original_did():
    model, x = _model(), _inputs(0)
    for alone in (LayerPlan(), LayerPlan(rank=0.5)):  # a factorized layer: its first factor
        plan = Plan({"0": alone.replace(smooth=0.5)})
        smoothed = compress(model, plan, Target(example_input=x)).module
        assert isinstance(smoothed[0][0], InputScale)
        assert smoothed[0][0].shift.abs().max() > 0  # it did scale
        with torch.no_grad():
            reference = compress(model, Plan({"0": alone})).module(x)
            torch.testing.assert_close(smoothed(x), reference, rtol=1e-6, atol=1e-6)


def test_a_hugging_face_conv1d_is_smoothed_as_the_linear_it_is():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(48, 64)).eval()  # 64 -> 48
    x = _inputs(1)
    smoothed = compress(model, Plan({"0": LayerPlan(smooth=0.5)}), Target(example_input=x))
    with torch.no_grad():
        torch.testing.assert_close(smoothed.module(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_factors_balance_input_and_weight_ranges_and_skip_dead_channels():
    inputs = torch.tensor([64.0, 1.0, 0.0, 4.0])
    weights = torch.tensor([1.0, 1.0, 2.0, 0.0])
    shifts = smoothing_shifts(inputs, weights, 0.5)
    assert shifts.dtype == torch.int8 and shifts.tolist() == [3, 0, 0, 0]  # sqrt(64) = 2^3
    assert smoothing_shifts(inputs, weights, 1.0).tolist() == [6, 0, 0, 0]


def _error(model: nn.Module, smooth: float, kernel: str = "int8_dynamic") -> float:
    calibration = [_inputs(seed) for seed in range(2, 6)]
    target = Target("cpu", calibration[0], calibration=calibration)
    plan = Plan({"0": LayerPlan(bits=8, smooth=smooth, kernel=kernel)})
    loaded = load_artifact(artifact_bytes(compress(model, plan, target)), _model(), target)
    held_out = _inputs(9, rows=256)
    with torch.no_grad():
        want = model(held_out)
        return float((loaded(held_out) - want).norm() / want.norm())


def test_smoothing_lowers_the_error_of_int8_activations_with_outlier_channels():
    model = _model()
    plain = _error(model, 0.0)
    assert _error(model, 0.5) < 0.5 * plain
    assert _error(model, 0.75) < 0.5 * plain


def test_a_plan_with_smoothing_saves_loads_and_probes_as_the_compressed_model(tmp_path):
    model, x = _model(), _inputs(0)
    target = Target(example_input=x)
    plan = Plan({"0": LayerPlan(bits=8, smooth=0.5), "2": LayerPlan(bits=4, smooth=0.75)})
    compressed = compress(model, plan, target)
    data = artifact_bytes(compressed)
    stored = load_tensors(stored_bytes(data))
    assert stored["0.0.shift"].dtype == torch.int8  # a byte per input channel
    assert torch.equal(stored["0.0.shift"], compressed.module[0][0].shift)
    assert read_plan(data) == plan
    loaded = load_artifact(data, _model())  # no input needed to load it
    assert isinstance(loaded[0][0], InputScale)
    with torch.no_grad(), applied(model, plan, target) as probed:
        assert torch.equal(probed(x), loaded(x))
    with torch.no_grad():
        assert torch.equal(model(x), _model()(x))  # the probe put the model back


def test_a_plan_without_smoothing_is_read_as_off_and_a_forged_exponent_is_refused():
    plan = Plan.from_json('{"format": 1, "layers": {"0": {"bits": 8}}}')
    assert plan.layers["0"].smooth == 0.0 and "smooth" not in plan.to_json()
    with pytest.raises(ValueError, match="smooth is a migration strength"):
        check_plan(Plan({"0": LayerPlan(smooth=1.5)}))
    model = _model()
    module = compress(model, Plan({"0": LayerPlan(smooth=0.5)}), Target(example_input=_inputs(0)))
    state = module.module.state_dict()
    state["0.0.shift"] = torch.full_like(state["0.0.shift"], 100)
    fresh = copy.deepcopy(module.module)
    with pytest.raises(RuntimeError, match="an exponent past"):
        fresh.load_state_dict(state)


def _bert_and_batch() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """transformers' BertModel (two layers, width 64) and a batch of token ids."""
    sys.path.insert(0, str(Path(__file__).parent / "zoo"))
    from zoo_models import build_bert

    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    return build_bert(), {"input_ids": ids}


def test_layers_reading_one_input_share_their_factors():
    """An attention's query, key and value read one tensor: smoothed at one alpha, they share
    one set of exponents, balanced against the largest of their weights' column ranges
    (SmoothQuant's own choice for them); a layer smoothed at another alpha keeps its own;
    the smoothed model computes exactly what the original did."""
    pytest.importorskip("transformers")
    model, batch = _bert_and_batch()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = Plan({n: LayerPlan(smooth=0.5) for n in linears})
    smoothed = compress(model, plan, Target("cpu", batch)).module
    attention = model.encoder.layer[1].attention.self
    parts = ("query", "key", "value")
    shifts = [getattr(smoothed.encoder.layer[1].attention.self, p)[0].shift for p in parts]
    assert all(torch.equal(shifts[0], shift) for shift in shifts[1:])
    seen = []
    hook = attention.query.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    input_range = seen[0].abs().flatten(0, 1).amax(0)
    ranges = [getattr(attention, p).weight.abs().amax(0) for p in parts]
    shared = smoothing_shifts(input_range, torch.stack(ranges).amax(0), 0.5)
    assert torch.equal(shifts[0], shared) and shared.abs().max() > 0
    assert not torch.equal(smoothing_shifts(input_range, ranges[0], 0.5), shared)  # not its own
    output = smoothed.encoder.layer[1].attention.output.dense[0].shift
    assert not torch.equal(output, shared)  # another input: its own factors
    with torch.no_grad():
        assert torch.equal(smoothed(**batch).last_hidden_state, model(**batch).last_hidden_state)

    value = "encoder.layer.1.attention.self.value"
    apart = compress(
        model, Plan({**plan.layers, value: LayerPlan(smooth=0.75)}), Target("cpu", batch)
    )
    attention = apart.module.encoder.layer[1].attention.self
    assert torch.equal(attention.query[0].shift, shared)  # query and key still share
    assert torch.equal(attention.key[0].shift, shared)
    assert torch.equal(
        attention.value[0].shift, smoothing_shifts(input_range, ranges[2], 0.75)
    )  # its own alpha, its own weight


def test_the_onnx_file_carries_smoothing_into_onnx_runtimes_integer_kernels(tmp_path):
    """Every Linear of a BERT smoothed on ``ort_int8_dynamic``: MatMulInteger on each, the
    attention still fused, and query, key and value scaled by one Mul whose product ONNX
    Runtime quantizes once, as many DynamicQuantizeLinear as the file without smoothing."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from autosqueeze.artifacts.export import OnnxModel, export_onnx

    model, batch = _bert_and_batch()
    target = Target("cpu", batch)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "pooler" not in n]
    ops = {}
    for smooth in (0.0, 0.5):
        plan = Plan({n: LayerPlan(bits=8, smooth=smooth, kernel="ort_int8_dynamic") for n in names})
        data = artifact_bytes(compress(model, plan, target))
        decoded = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
        path = tmp_path / f"bert{smooth}.onnx"
        notes = export_onnx(decoded, plan, stored_integers(data), batch, path)
        assert f"{len(names)} weights run ONNX Runtime's integer kernels" in notes[1]
        assert any("MultiHeadAttention" in note for note in notes)  # still fused
        ops[smooth] = [node.op_type for node in onnx.load(path).graph.node]
        assert ops[smooth].count("MatMulInteger") == len(names)
        with torch.no_grad():
            want = decoded(**batch).last_hidden_state
        have = OnnxModel(path)(**batch)
        cosine = torch.nn.functional.cosine_similarity(have.flatten(), want.flatten(), dim=0)
        assert cosine > 0.999
    layers = len(model.encoder.layer)
    for op in ("DynamicQuantizeLinear", "MultiHeadAttention"):
        assert ops[0.5].count(op) == ops[0.0].count(op), op
    # a Mul per input smoothed: query, key and value's one, the attention's output, the MLP's two
    assert ops[0.5].count("Mul") - ops[0.0].count("Mul") == 4 * layers


def test_a_space_offers_it_on_linears_but_not_on_a_tied_one(tmp_path):
    space_file = tmp_path / "space.yaml"
    rule = {"types": ["Linear"], "knobs": {"bits": [8, 32], "smooth": [0.0, 0.5, 0.75]}}
    space_file.write_text(yaml.safe_dump({"rules": [rule]}))
    ids = torch.randint(0, 64, (2, 8))
    space = build_space(TiedLM().eval(), space_file, Target("cpu", ids))
    assert "smooth" in space.layers["mix"].searched
    assert "smooth" not in space.layers["head"].searched
    assert "smooth" in space.withheld["head"]


def test_validate_takes_a_space_file_that_uses_it(tmp_path):
    space = yaml.safe_load((Path(__file__).parents[1] / "search_spaces/default.yaml").read_text())
    for rule in space["rules"]:
        if "Linear" in rule["types"]:
            rule["knobs"]["smooth"] = [0.0, 0.5, 0.75]
    space_file = write_yaml(tmp_path / "space.yaml", space)
    config = load_config(
        write_yaml(tmp_path / "study.yaml", study_config(tmp_path, space=str(space_file)))
    )
    found = validate(config)
    assert any("smooth" in layer.searched for layer in found.space.layers.values())
    assert any("smooth" in warning for warning in found.warnings)  # no task.calibration
