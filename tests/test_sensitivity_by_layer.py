"""The sensitivity pass by layer (``sensitivity.by``): one forward pass records what each
layer took and gave; a probe runs the layers it changes alone on those inputs; a few
whole-model checks scale their error into the model's distortion and metric."""

from __future__ import annotations

import pytest
import torch
from conftest import study_config, write_yaml
from torch import nn

from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.layer_calls import record_calls, relative_error
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.task import load_task
from autosqueeze.searching.executors.inprocess import InProcessExecutor
from autosqueeze.searching.probe import BASE
from autosqueeze.searching.search import pass_by, sensitivity_table
from autosqueeze.searching.sensitivity import probes_of
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study


class _Stem(nn.Module):
    """A convolution whose output an in-place ReLU overwrites as soon as it is made."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def test_a_layers_calls_are_kept_as_they_were_made_and_judge_it_alone():
    torch.manual_seed(0)
    model, x = _Stem().eval(), torch.randn(2, 3, 8, 8)
    calls = record_calls(model, ["conv", "head"], [x, x[:1]])
    assert [len(calls[n]) for n in ("conv", "head")] == [2, 2]
    with torch.inference_mode():
        assert torch.equal(calls["conv"][0].outputs[0], model.conv(x))  # not the ReLU's
        assert (calls["conv"][0].outputs[0] < 0).any()
    assert relative_error(model.conv, calls["conv"]) == 0.0
    with torch.no_grad():
        model.conv.weight.mul_(1.1)  # every output 10% larger: (0.1 y)^2 / y^2 (the bias aside)
        model.conv.bias.mul_(1.1)
    assert relative_error(model.conv, calls["conv"]) == pytest.approx(0.01, rel=1e-4)


def test_a_probe_by_layer_judges_the_layers_it_changes_and_refuses_a_reshaping_one(tmp_path):
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path)))
    evaluator = Evaluator(load_task(config))
    got = evaluator.layer_probe(Plan({"features.5": LayerPlan(bits=3)}))
    assert got.error is None and set(got.layer_errors) == {"features.5"}
    assert 0 < got.layer_errors["features.5"] < 0.5
    assert (
        evaluator.layer_probe(Plan({"features.5": LayerPlan(bits=8)})).layer_errors["features.5"]
        < got.layer_errors["features.5"]
    )
    with pytest.raises(Exception, match="reshapes the layers around it"):
        evaluator.layer_probe(Plan({"features.0": LayerPlan(prune_channels=0.5)}))


def test_the_pass_by_layer_checks_a_few_probes_by_model_and_predicts_the_rest(tmp_path):
    config = load_config(
        write_yaml(
            tmp_path / "s.yaml",
            study_config(tmp_path, sensitivity={"by": "layer", "checks": 4}),
        )
    )
    task = load_task(config)
    space = build_space(task.model, config.space, task.target)
    executor = InProcessExecutor(task)
    by_model: list[str] = []

    class Counting:
        def probes(self, plans):
            by_model.extend(plans)
            return executor.probes(plans)

        def layer_probes(self, plans):
            return executor.layer_probes(plans)

        def timings(self, plans):
            return executor.timings(plans)

    study = open_study(config, create=True)
    table = sensitivity_table(study, config, space, Counting(), task=task, progress=False)
    assert table.by == "layer" and table.why_by == "sensitivity.by: layer"
    assert len(table.checks) == 4 and not set(table.checks) & set(table.predicted)
    reshaping = [p.key for p in probes_of(space) if p.knob == "prune_channels"]
    assert reshaping and not set(reshaping) & set(table.predicted)
    # by whole model: the base, the checks and the reshaping probes (those a chain reached)
    assert {BASE, *table.checks} <= set(by_model) <= {BASE, *table.checks, *reshaping}
    assert len(by_model) == len(set(by_model))
    judged = [p.key for p in probes_of(space) if p.key not in reshaping]
    assert set(table.predicted) | set(table.checks) == set(judged) - set(table.failed)
    for key in table.predicted:
        assert table.distortions[key] >= 0 and key in table.drops
    # a second run reads the table: nothing measured again
    by_model.clear()
    again = sensitivity_table(study, config, space, Counting(), task=task, progress=False)
    assert by_model == [] and again.predicted == table.predicted


def test_auto_probes_by_layer_past_a_parameter_count(tmp_path):
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path)))
    task = load_task(config)
    count = sum(p.numel() for p in task.model.parameters())
    assert pass_by(config, task)[0] == "model"
    small = config.model_copy(
        update={"sensitivity": config.sensitivity.model_copy(update={"by_layer_above": 1000})}
    )
    by, why = pass_by(small, task)
    assert by == "layer" and why == f"{count:,} parameters, past sensitivity.by_layer_above (1,000)"
