"""``evaluate_file``: ``autosqueeze evaluate`` called from Python, on a real artifact."""

from __future__ import annotations

import pytest
from conftest import study_config, write_yaml

from autosqueeze import Evaluator, LayerPlan, Measurements, Plan, evaluate_file, load_artifact
from autosqueeze.examples.digits import pretrained_cnn
from autosqueeze.problem.task import load_task
from autosqueeze.settings.config import load_config


def test_evaluate_file_measures_the_file_and_gives_its_latency_as_the_study_stores_it(tmp_path):
    task = load_task(load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path))))
    path = tmp_path / "model.safetensors"
    evaluator = Evaluator(task)
    try:
        size = evaluator.build(Plan({"classifier.1": LayerPlan(bits=3, prune=0.5)}), path)
    finally:
        evaluator.close()
    study_reference = Measurements(metric=0.98, size_bytes=750_000, latency_ms=2.0)

    done = evaluate_file(task, path, reference=study_reference)
    got = done.measurements
    assert got.size_bytes == size == path.stat().st_size
    assert got.metric == task.evaluate_metric(load_artifact(path, pretrained_cnn(), task.target))
    assert got.speedup is not None and done.study_latency_ms == pytest.approx(2.0 / got.speedup)
    assert done.stored_bytes is not None and done.stored_bytes >= size  # deflated or not
    assert done.packed_bytes is not None and done.packed_bytes > 0
