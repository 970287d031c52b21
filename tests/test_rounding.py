"""``round_by: gptq``: GPTQ's error-compensating rounding on hand-made layers with correlated
inputs (Linear, Hugging Face's Conv1D, convolutions, grouped ones), its integers stored as
chosen, pruned zeros kept, and the input Hessians kept across compressions by what the
inputs depend on."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import yaml
from torch import nn

from autosqueeze.artifacts.artifact import (
    artifact_bytes,
    artifact_size,
    load_artifact,
    read_plan,
    save_artifact,
    stored_bytes,
    stored_integers,
)
from autosqueeze.common.errors import UserError
from autosqueeze.compression.codecs import dequantize, encode_quantized, quantize
from autosqueeze.compression.size_model import layer_bytes, stored_weights
from autosqueeze.compression.techniques import Target, applied, compress
from autosqueeze.compression.techniques.calibration import unfolded
from autosqueeze.examples.digits import calibration, pretrained_cnn
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searching.probe import Probe
from autosqueeze.searching.sensitivity import probe_plan
from autosqueeze.searchspace.space import build_space


def _correlated(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs that span few directions, some much louder: as real features are, and where
    rounding each weight alone is far from the least output error."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16, generator=generator) @ torch.randn(16, features, generator=generator)
    x[:, : features // 8] *= 10
    return x + 0.05 * torch.randn(rows, features, generator=generator)


def _linear(features: int = 64, outputs: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, outputs)).eval()


def _relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        want = reference(x)
        return float((model(x) - want).pow(2).sum() / want.pow(2).sum())


def _shipped(model: nn.Module, plan: Plan, target: Target, fresh: nn.Module) -> nn.Module:
    """The model as the plan's artifact loads it."""
    return load_artifact(artifact_bytes(compress(model, plan, target)), fresh, target)


@pytest.mark.parametrize(("bits", "group_size"), [(3, None), (3, 16), (4, None), (4, 16)])
def test_gptq_moves_a_linears_outputs_less_than_rounding_to_nearest(bits, group_size):
    model, x = _linear(), _correlated(512, 64, seed=1)
    target = Target(calibration=[x[:256], x[256:]])
    errors = {}
    for by in ("nearest", "gptq"):
        plan = Plan({"0": LayerPlan(bits=bits, group_size=group_size, round_by=by)})
        errors[by] = _relative_error(_shipped(model, plan, target, _linear(seed=9)), model, x)
    assert errors["gptq"] < 0.5 * errors["nearest"], errors


def test_hugging_face_conv1d_is_rounded_as_the_linear_it_is_with_its_own_scales():
    """Conv1D stores (in, out), so its scales are per input, grouped along the outputs: a
    column's scales are chosen when GPTQ reaches it."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    linear, x = _linear(), _correlated(512, 64, seed=2)

    def conv1d() -> nn.Sequential:
        layer = pytorch_utils.Conv1D(32, 64)  # (nf=out, nx=in): weight (in, out)
        with torch.no_grad():
            layer.weight.copy_(linear[0].weight.t())
            layer.bias.copy_(linear[0].bias)
        return nn.Sequential(layer).eval()

    target = Target(calibration=[x])
    for group_size in (None, 8):
        errors = {}
        for by in ("nearest", "gptq"):
            plan = Plan({"0": LayerPlan(bits=3, group_size=group_size, round_by=by)})
            compressed = compress(conv1d(), plan, target)
            loaded = load_artifact(artifact_bytes(compressed), conv1d(), target)
            errors[by] = _relative_error(loaded, linear, x)
            if by == "gptq":
                q, scale, _ = stored_integers(artifact_bytes(compressed))["0.weight"]
                assert q.shape == (64, 32)
                assert scale.shape == (64, 1 if group_size is None else 4)  # per input row
        assert errors["gptq"] < 0.5 * errors["nearest"], (group_size, errors)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_convolution_is_rounded_on_its_unfolded_inputs_group_by_group(groups):
    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, groups=groups)).eval()
    generator = torch.Generator().manual_seed(4)
    coarse = torch.randn(32, 3, 3, 3, generator=generator)  # smooth images: neighbours agree
    smooth = nn.functional.interpolate(coarse, size=(6, 6), mode="bilinear")
    mix = torch.randn(3, 8, generator=generator)  # channels that move together
    x = torch.einsum("nchw,cd->ndhw", smooth, mix)
    x = x + 0.05 * torch.randn(x.shape, generator=generator)
    target = Target(calibration=[x[:16], x[16:]])
    errors = {}
    for by in ("nearest", "gptq"):
        plan = Plan({"0": LayerPlan(bits=3, round_by=by)})
        errors[by] = _relative_error(_shipped(conv, plan, target, copy.deepcopy(conv)), conv, x)
    assert errors["gptq"] < 0.7 * errors["nearest"], errors


def test_a_conv1d_and_strided_convolutions_unfold_as_they_convolve():
    """The Hessian's rows are the patches the weight multiplies: a 1-D convolution and a
    strided, dilated 2-D one, each unfolded, times its weight, give its output."""
    torch.manual_seed(5)
    for conv, x in (
        (nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2), torch.randn(2, 4, 11)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), torch.randn(2, 4, 9, 7)),
    ):
        groups, per_group = conv.groups, conv.out_channels // conv.groups
        rows = unfolded(conv, x)  # (groups, patches, in/groups x kernel)
        got = torch.einsum("gpd,god->gpo", rows, conv.weight.reshape(groups, per_group, -1))
        with torch.no_grad():
            out = conv(x) - conv.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
        want = out.reshape(len(x), groups, per_group, -1).permute(1, 0, 3, 2)
        torch.testing.assert_close(got, want.reshape(groups, -1, per_group))


def test_pruned_zeros_stay_zero_and_their_error_is_moved_onto_the_weights_left():
    model, x = _linear(), _correlated(512, 64, seed=6)
    target = Target(calibration=[x])
    for prune_by in ("magnitude", "activation"):
        pruned = compress(model, Plan({"0": LayerPlan(prune=0.5, prune_by=prune_by)}), target)
        zeros = pruned.module[0].weight == 0
        plan = Plan({"0": LayerPlan(prune=0.5, prune_by=prune_by, bits=4, round_by="gptq")})
        loaded = _shipped(model, plan, target, _linear(seed=9))
        weight = loaded[0].weight
        assert bool((weight[zeros] == 0).all()), prune_by
        nearest_plan = Plan({"0": plan.layers["0"].replace(round_by="nearest")})
        nearest = _shipped(model, nearest_plan, target, _linear(seed=9))
        # against what GPTQ rounds (the pruned weights): pruning's own error, 0.10 of the
        # output here, is not rounding's to move
        reference = pruned.module
        assert _relative_error(loaded, reference, x) < _relative_error(nearest, reference, x), (
            prune_by
        )


def test_pruning_by_the_hessian_with_gptq_is_one_sweep_sparsegpts_joint_form(tmp_path):
    """A layer pruned by the Hessian and rounded by GPTQ is pruned inside GPTQ's sweep: its
    mask is chosen on the way (not SparseGPT's alone, then kept), with the share of zeros
    asked, and the artifact stores exactly the integers the sweep chose."""
    model, x = _linear(), _correlated(512, 64, seed=6)
    target = Target(calibration=[x])
    joint = LayerPlan(prune=0.5, prune_by="hessian", bits=4, round_by="gptq")
    compressed = compress(model, Plan({"0": joint}), target)
    q = compressed.rounded["0.weight"].q
    assert int((q == 0).sum()) >= q.numel() // 2
    alone = compress(model, Plan({"0": LayerPlan(prune=0.5, prune_by="hessian")}), target)
    assert not torch.equal(q == 0, alone.module[0].weight == 0)  # its own mask
    path = tmp_path / "joint.safetensors"
    save_artifact(compressed, path)
    assert torch.equal(stored_integers(path)["0.weight"][0], q)
    loaded = load_artifact(path, _linear(seed=9), target)
    nearest = Plan({"0": joint.replace(round_by="nearest")})  # SparseGPT, then nearest
    shipped = _shipped(model, nearest, target, _linear(seed=9))
    assert _relative_error(loaded, model, x) < _relative_error(shipped, model, x)


def test_the_artifact_stores_the_integers_gptq_chose_and_loads_the_model_measured(tmp_path):
    """Quantizing the rounded weight again may choose other scales, so GPTQ's integers and
    scales are stored as chosen; the file loads bit for bit into the in-memory model."""
    model, x = _linear(), _correlated(512, 64, seed=7)
    target = Target(calibration=[x])
    plan = Plan({"0": LayerPlan(bits=3, group_size=16, round_by="gptq")})
    compressed = compress(model, plan, target)
    path = tmp_path / "model.safetensors"
    save_artifact(compressed, path)
    chosen = compressed.rounded["0.weight"]
    q, scale, group = stored_integers(path)["0.weight"]
    assert torch.equal(q, chosen.q) and torch.equal(scale, chosen.scale) and group == 16
    # why they are carried: a group none of whose integers is at the grid's end (GPTQ moved
    # its largest weight, or pruning zeroed it) is quantized again on a finer grid
    alone = torch.tensor([[1, -2, 0, 1]], dtype=torch.int8), torch.tensor([[0.5]]).half()
    assert not torch.equal(quantize(dequantize(*alone, None), 3, None)[1], alone[1])
    assert read_plan(path) == plan
    loaded = load_artifact(path, _linear(seed=9), target)
    with applied(model, plan, target) as in_memory:
        for key, value in in_memory.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
    assert artifact_size(compressed) == len(stored_bytes(path))


def test_a_plan_without_round_by_rounds_to_nearest_and_stores_no_setting(tmp_path):
    model = _linear()
    plan = Plan.from_dict({"format": 1, "layers": {"0": {"bits": 4}}})  # as before the setting
    assert plan.layers["0"].round_by == "nearest"
    path = tmp_path / "model.safetensors"
    save_artifact(compress(model, plan), path)
    assert "round_by" not in json.dumps(read_plan(path).to_dict())
    assert read_plan(path) == Plan({"0": LayerPlan(bits=4, round_by="nearest")})
    with pytest.raises(ValueError, match="round_by is one of nearest, gptq"):
        compress(model, Plan({"0": LayerPlan(bits=4, round_by="obq")}))


def test_the_hessians_are_computed_once_per_calibration_and_upstream_content():
    """The pass runs again only when the calibration batches or a module before the layer
    change: pruning the layer itself, or a layer after it, keeps its Hessian."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 12)).eval()
    calls = []
    model[0].register_forward_pre_hook(lambda m, args: calls.append(1))  # copies keep it
    x = _correlated(128, 24, seed=8)
    target = Target(calibration=[x[:64], x[64:]])
    rounded = LayerPlan(bits=3, round_by="gptq")

    def passes(plan: Plan, where: Target = target) -> int:
        before = len(calls)
        compress(model, plan, where)
        return (len(calls) - before) // 2  # two batches a pass

    assert passes(Plan({"0": rounded, "2": rounded})) == 1
    assert passes(Plan({"0": rounded, "2": rounded})) == 0  # both kept
    assert passes(Plan({"2": rounded.replace(prune=0.5)})) == 0  # its own weights: no matter
    assert passes(Plan({"0": rounded, "2": LayerPlan(prune=0.5)})) == 0  # after layer 0
    assert passes(Plan({"0": LayerPlan(prune=0.5), "2": rounded})) == 1  # before layer 2
    assert passes(Plan({"0": LayerPlan(prune=0.5), "2": rounded})) == 0
    assert passes(Plan({"2": rounded}), Target(calibration=[x[64:], x[:64]])) == 1  # others
    before = len(calls)
    with applied(model, Plan({"2": rounded}), target):  # a probe: the same model, kept
        assert len(calls) == before


def test_the_size_model_prices_a_gptq_layer_as_rounded_to_nearest():
    """Within 8%, as pruned or factorized layers are: where the layout is Huffman-coded,
    GPTQ's census of levels differs a little from round-to-nearest's (and inputs that never
    fire zero their weights), so the knapsack's bytes are an estimate there."""
    model = pretrained_cnn()
    target = Target(calibration=calibration())
    for name, bits, group in itertools.product(
        ("features.2", "features.5", "classifier.1"), (3, 4, 6), (None, 32)
    ):
        layer = model.get_submodule(name)
        compressed = compress(
            model, Plan({name: LayerPlan(bits=bits, group_size=group, round_by="gptq")}), target
        )
        weight = compressed.module.get_parameter(f"{name}.weight")
        chosen = compressed.chosen(f"{name}.weight", weight, compressed.codecs[f"{name}.weight"])
        assert chosen is not None
        stored = encode_quantized(chosen.q, chosen.scale, chosen.codec)
        predicted = layer_bytes(layer, stored_weights(layer, bits, group))
        assert abs(predicted - stored.nbytes) <= 0.08 * stored.nbytes, (name, bits, group)


def test_a_space_rule_gives_round_by_to_its_plans_and_probes(tmp_path):
    rule = {"types": ["Linear"], "knobs": {"bits": [3, 4, 32]}, "round_by": "gptq"}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"rules": [rule]}))
    space = build_space(_linear(), path)
    assert space.plan({"0.bits": 4}).layers["0"] == LayerPlan(bits=4, round_by="gptq")
    assert probe_plan(space, Probe("0", "bits", 3)).layers["0"].round_by == "gptq"
    path.write_text(yaml.safe_dump({"rules": [{**rule, "round_by": "obq"}]}))
    with pytest.raises(UserError, match="round_by"):
        build_space(_linear(), path)
