"""Pruning criteria on hand-made layers: magnitude zeroes the smallest |w|; activation (Wanda)
zeroes the smallest |w| x input norm within each output row, so a large weight on a quiet
input goes first (Linear, Hugging Face's Conv1D and grouped convolutions alike); hessian
(SparseGPT) also moves each zeroed weight's error onto the weights left, so the layer's
outputs on the calibration inputs change least."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn

from autosqueeze.artifacts.artifact import load_artifact, read_plan, save_artifact
from autosqueeze.common.errors import UserError
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searchspace.space import build_space

WEIGHT = torch.tensor([[1.0, 0.6, 0.2, 0.9], [0.5, 0.4, 3.0, 0.1]])
# input feature 0 is quiet (norm 0.01 x 2 rows), the others loud
INPUTS = torch.tensor([[0.01, 1.0, 1.0, 1.0], [0.01, -1.0, 1.0, -1.0]])


def _linear() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(WEIGHT)
    return model.eval()


def _zeros(weight: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row == 0).flatten().tolist() for row in weight]


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [("magnitude", [[2], [3]]), ("activation", [[0], [0]])],
)
def test_each_criterion_removes_the_weights_it_should_from_a_linear(criterion, expected):
    plan = Plan({"0": LayerPlan(prune=0.25, prune_by=criterion)})
    pruned = compress(_linear(), plan, Target(calibration=[INPUTS])).module
    assert _zeros(pruned[0].weight) == expected  # one per row, by that row's scores


def test_activation_pruning_reads_the_example_input_without_calibration():
    plan = Plan({"0": LayerPlan(prune=0.25, prune_by="activation")})
    pruned = compress(_linear(), plan, Target(example_input=INPUTS)).module
    assert _zeros(pruned[0].weight) == [[0], [0]]
    with pytest.raises(ValueError, match="needs task.calibration or an example input"):
        compress(_linear(), plan, Target())
    with pytest.raises(ValueError, match="prune_by is one of"):
        compress(_linear(), Plan({"0": LayerPlan(prune=0.25, prune_by="obs")}))


def test_hugging_face_conv1d_is_pruned_as_the_linear_it_is():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(2, 4)).eval()  # (nf=out, nx=in): weight (in, out)
    with torch.no_grad():
        model[0].weight.copy_(WEIGHT.t())
        model[0].bias.zero_()
    plan = Plan({"0": LayerPlan(prune=0.25, prune_by="activation")})
    pruned = compress(model, plan, Target(calibration=[INPUTS])).module
    assert _zeros(pruned[0].weight.t()) == [[0], [0]]


def test_a_grouped_convolution_weighs_each_row_by_its_own_groups_channels():
    conv = nn.Conv2d(4, 2, 1, groups=2, bias=False)  # row 0 reads channels 0-1, row 1 2-3
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.5], [0.5, 1.0]]).reshape(2, 2, 1, 1))
    x = torch.ones(1, 4, 3, 3)
    x[:, 0] = 0.01  # channel 0 quiet: row 0 loses its larger weight
    x[:, 3] = 0.01  # channel 3 quiet: row 1 loses its larger weight
    plan = Plan({"0": LayerPlan(prune=0.5, prune_by="activation")})
    pruned = compress(nn.Sequential(conv).eval(), plan, Target(calibration=[x])).module
    assert pruned[0].weight.flatten().tolist() == [0.0, 0.5, 0.5, 0.0]


def test_a_space_rule_sets_the_criterion_and_the_artifact_keeps_it(tmp_path):
    rule = {"types": ["Linear"], "knobs": {"prune": [0.0, 0.25]}, "prune_by": "activation"}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"rules": [rule]}))
    space = build_space(_linear(), path, Target(example_input=INPUTS))
    plan = space.plan({"0.prune": 0.25})
    assert plan.layers["0"] == LayerPlan(prune=0.25, prune_by="activation")
    assert space.params_for(plan) == {"0.prune": 0.25}
    artifact = tmp_path / "model.safetensors"
    save_artifact(compress(_linear(), plan, Target(calibration=[INPUTS])), artifact)
    assert read_plan(artifact) == plan
    assert _zeros(load_artifact(artifact, _linear())[0].weight) == [[0], [0]]
    path.write_text(yaml.safe_dump({"rules": [{**rule, "prune_by": "obs"}]}))
    with pytest.raises(UserError, match="prune_by"):  # the field named
        build_space(_linear(), path, Target(example_input=INPUTS))


def test_the_hessian_criterion_changes_the_outputs_least_at_the_same_sparsity():
    torch.manual_seed(0)
    x = torch.randn(512, 16) @ torch.randn(16, 64)  # correlated inputs, as real features are
    x[:, :8] *= 10  # and some loud ones
    layer = nn.Linear(64, 32, bias=False)
    errors, zeros = {}, {}
    for criterion in ("magnitude", "activation", "hessian"):
        plan = Plan({"0": LayerPlan(prune=0.5, prune_by=criterion)})
        model = nn.Sequential(copy.deepcopy(layer)).eval()
        pruned = compress(model, plan, Target(calibration=[x[:256], x[256:]])).module[0]
        with torch.no_grad():
            errors[criterion] = float((pruned(x) - layer(x)).pow(2).sum() / layer(x).pow(2).sum())
        zeros[criterion] = int((pruned.weight == 0).sum())
    assert zeros == {c: 1024 for c in zeros}  # exactly half of 64 x 32, by each
    assert errors["hessian"] < 0.5 * errors["activation"] < 0.5 * errors["magnitude"], errors


def test_the_hessian_criterion_takes_the_activation_one_on_convolutions():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = [torch.randn(2, 4, 5, 5) * torch.tensor([0.1, 1.0, 3.0, 1.0])[None, :, None, None]]
    got = {
        criterion: compress(
            nn.Sequential(copy.deepcopy(conv)).eval(),
            Plan({"0": LayerPlan(prune=0.5, prune_by=criterion)}),
            Target(calibration=x),
        )
        .module[0]
        .weight
        for criterion in ("activation", "hessian")
    }
    assert torch.equal(got["activation"], got["hessian"])


def test_two_of_four_keeps_the_larger_two_of_every_four_inputs_of_each_row(tmp_path):
    """2:4: in each row, each run of 4 inputs loses its 2 smallest |w| (ties: the first go);
    GPT-2's Conv1D is grouped along its inputs too, the rows of its transposed weight."""
    weight = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 9.0], [4, 3, 2, 1, 1, 1, 1, 1]])
    model = nn.Sequential(nn.Linear(8, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(weight)
    plan = Plan({"0": LayerPlan(prune=0.5, prune_by="2:4")})
    pruned = compress(model, plan).module[0].weight
    assert _zeros(pruned) == [[0, 3, 5, 6], [2, 3, 4, 5]]
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv1d = nn.Sequential(pytorch_utils.Conv1D(2, 8)).eval()
    with torch.no_grad():
        conv1d[0].weight.copy_(weight.t())
    assert _zeros(compress(conv1d, plan).module[0].weight.t()) == [[0, 3, 5, 6], [2, 3, 4, 5]]
    artifact = tmp_path / "model.safetensors"  # stored as any half-pruned weight: a bitmap
    save_artifact(compress(model, plan), artifact)
    assert _zeros(load_artifact(artifact, _linear8())[0].weight) == [[0, 3, 5, 6], [2, 3, 4, 5]]


def _linear8() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 2, bias=False)).eval()


def test_two_of_four_is_half_the_weights_and_the_sparse24_kernel_needs_it(tmp_path):
    model = _linear8()
    with pytest.raises(ValueError, match="layer '0': prune_by 2:4 .* prune is 0.5, not 0.25"):
        compress(model, Plan({"0": LayerPlan(prune=0.25, prune_by="2:4")}))
    with pytest.raises(ValueError, match="layer '0': kernel sparse24 runs weights pruned 2:4"):
        compress(model, Plan({"0": LayerPlan(prune=0.5, kernel="sparse24")}))
    compress(model, Plan({"0": LayerPlan(prune=0.5, prune_by="2:4", kernel="sparse24")}))
    rule = {"types": ["Linear"], "knobs": {"prune": [0.0, 0.25]}, "prune_by": "2:4"}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"rules": [rule]}))
    with pytest.raises(UserError, match=r"prune_by 2:4 zeroes half the weights: list prune as"):
        build_space(model, path)
