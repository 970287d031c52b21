"""Layer timings kept by signature (layer shape, plan, device): each timed once, then reused
across layers of one shape and across studies."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, study_config, write_yaml
from tiny_bert import build as tiny_bert
from tiny_bert import data as tiny_data
from torch import nn

from autosqueeze.measuring.timing_cache import FILE, TimingCache, probe_signatures
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.task import load_task
from autosqueeze.searching.executors.inprocess import InProcessExecutor
from autosqueeze.searching.search import sensitivity_table
from autosqueeze.searching.sensitivity import SensitivityTable, probes_of
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study

DEVICE = "cpu|test"


def _bert_study(tmp_path, name, **sensitivity):
    config = study_config(
        tmp_path / name,
        name=name,
        model={"factory": "tiny_bert:build"},
        task={"data": "tiny_bert:data", "metric": "fidelity"},
        space=str(REPO / "search_spaces" / "bert.yaml"),
        budgets={"max_metric_drop": 0.05, "max_size_mb": None},
        objectives=["metric", "size_bytes", "latency_ms"],
        sensitivity={"samples": 8, **sensitivity},
    )
    (tmp_path / name).mkdir()
    return load_config(write_yaml(tmp_path / name / "s.yaml", config))


class Counted:
    """The in-process executor, counting the plans each call to ``timings`` asks for."""

    def __init__(self, task):
        self.executor, self.asked = InProcessExecutor(task), []

    def probes(self, plans):
        return self.executor.probes(plans)

    def timings(self, plans):
        self.asked.append(len(plans))
        return self.executor.timings(plans)

    def layer_probes(self, plans):
        return self.executor.layer_probes(plans)


def _pass(config):
    task = load_task(config)
    space = build_space(task.model, config.space, task.target)
    executor = Counted(task)
    study = open_study(config, create=True)
    table = sensitivity_table(study, config, space, executor, task=task, progress=False)
    return space, table, executor.asked


def test_layers_of_one_shape_are_timed_once_and_a_second_study_times_none_again(
    tmp_path, own_cache
):
    space, first, asked = _pass(_bert_study(tmp_path, "first"))
    timed = [p for p in probes_of(space) if p.knob in ("kernel", "rank")]
    # both blocks' layers have the same shapes: one of each pair is timed, the other reuses it
    assert asked and asked[0] <= len(timed) // 2 + 1
    assert len(first.speeds) + len(first.untimed) == len(timed)
    for probe in timed:
        twin = probe.key.replace("layer.0.", "layer.1.").replace("[0]", "[1]")
        if twin != probe.key and twin in first.speeds:
            assert first.speeds[probe.key] == first.speeds[twin]
    assert json.loads((own_cache / FILE).read_text())["timings"]

    _, second, asked = _pass(_bert_study(tmp_path, "second"))
    assert asked == [1]  # one timing, for the whole model's milliseconds
    assert second.speeds == first.speeds and second.model_ms is not None

    _, third, asked = _pass(_bert_study(tmp_path, "third", timing_cache=False))
    assert asked == [len(timed)]  # without the cache: every probe timed
    assert set(third.speeds) == set(first.speeds)


def test_a_signature_tells_shapes_plans_and_devices_apart():
    model, batch = tiny_bert(), tiny_data(4, 1)[0][0]
    q0, q1 = "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"
    up = "encoder.layer.0.intermediate.dense"
    plans = {
        "q0": Plan({q0: LayerPlan(kernel="bf16")}),
        "q1": Plan({q1: LayerPlan(kernel="bf16")}),
        "q0-int8": Plan({q0: LayerPlan(kernel="int8_dynamic")}),
        "up": Plan({up: LayerPlan(kernel="bf16")}),
        "stored-only": Plan({q0: LayerPlan(bits=4)}),  # runs as before: nothing to time
    }
    found = probe_signatures(model, batch, plans, DEVICE)
    assert found["q0"] == found["q1"]  # the same shape, plan and device
    assert len({found["q0"], found["q0-int8"], found["up"]}) == 3
    assert found["stored-only"] is None
    assert probe_signatures(model, batch, plans, "cpu|other")["q0"] != found["q0"]
    shorter = {k: v[:, :6] for k, v in batch.items()}
    assert probe_signatures(model, shorter, plans, DEVICE)["q0"] != found["q0"]  # other inputs


def test_layers_alike_but_for_their_stride_are_timed_apart():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    model[1].register_forward_pre_hook(lambda _m, args: (args[0][:, :, :16, :16],))
    plans = {str(i): Plan({str(i): LayerPlan(kernel="bf16")}) for i in range(2)}
    found = probe_signatures(model, torch.randn(1, 8, 16, 16), plans, DEVICE)
    assert found["0"] is not None and found["0"] != found["1"]  # same weights, same input


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '["a list"]',
        '{"format": 1, "timings": "none"}',
    ],
)
def test_a_cache_file_that_is_not_ours_is_set_aside_with_a_warning(tmp_path, text):
    path = tmp_path / FILE
    path.write_text(text)
    with pytest.warns(UserWarning, match="timing cache .* is ignored"):
        cache = TimingCache(path)
    cache.put("a" * 64, 1.0, 0.5)
    cache.save()
    assert TimingCache(path).get("a" * 64) == (1.0, 0.5)


def test_entries_that_are_not_two_positive_numbers_are_never_believed(tmp_path):
    path = tmp_path / FILE
    good, keys = "a" * 64, ["b" * 64, "c" * 64, "d" * 64, "e" * 64, "short"]
    bad = [[1.0], [1.0, -2.0], [1.0, "fast"], [True, 1.0], [1.0, 2.0]]
    path.write_text(
        json.dumps({"format": 1, "timings": {good: [2.0, 1.0], **dict(zip(keys, bad))}})
    )
    cache = TimingCache(path)
    assert cache.get(good) == (2.0, 1.0)
    assert all(cache.get(k) is None for k in keys)
    cache.put("f" * 64, float("nan"), 1.0)  # a failed timing is not kept
    assert cache.get("f" * 64) is None
    path.write_text(json.dumps({"format": 0, "timings": {good: [2.0, 1.0]}}))
    assert TimingCache(path).get(good) is None  # what a timing meant then is not what it is


def test_the_fastest_original_timing_of_a_signature_is_kept(tmp_path):
    path, key = tmp_path / FILE, "a" * 64
    first = TimingCache(path)
    first.put(key, 2.0, 1.0)
    first.save()
    second = TimingCache(path)
    second.put(key, 8.0, 1.0)  # taken on a busy day: slower, not kept
    assert second.get(key) == (2.0, 1.0)
    second.put(key, 1.5, 0.5)
    second.save()
    assert TimingCache(path).get(key) == (1.5, 0.5)


def test_layers_timed_slower_than_their_model_are_scaled_into_it():
    table = SensitivityTable(samples=1, model_ms=1.0)
    table.layer_ms = {'a.kernel="bf16"': 3.0, 'b.kernel="bf16"': 1.0}  # 4 ms of a 1 ms model
    table.speeds = {'a.kernel="bf16"': 0.1, 'b.kernel="bf16"': 0.1}
    assert table.group_ms("a") == pytest.approx(0.75) and table.group_ms("b") == 0.25
    table.model_ms = 10.0  # once the layers fit in the model, they are taken as timed
    assert table.group_ms("a") == 3.0
