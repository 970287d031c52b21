"""``validate(config)``: the checks of ``autosqueeze validate``, called from Python."""

from __future__ import annotations

import pytest
from conftest import study_config, write_yaml

from autosqueeze import UserError, validate
from autosqueeze.searching.executors import evaluator_capacity
from autosqueeze.settings.config import load_config


def test_validate_finds_the_model_data_space_and_smallest_model_and_writes_nothing(tmp_path):
    config = load_config(write_yaml(tmp_path / "study.yaml", study_config(tmp_path)))
    found = validate(config)
    assert found.metric > 0.95  # the pretrained digits CNN
    assert found.parameters == sum(p.numel() for p in found.task.model.parameters())
    assert 0 < found.smallest_bytes < found.parameters  # far below 1 byte per weight
    assert len(found.space.layers) == 5 and found.students == {}
    assert found.parameters_reached == found.parameters_total == found.parameters
    assert (found.executor, found.capacity, found.sampler) == ("inprocess", "", "TPESampler")
    # structural knobs without calibration batches: no recovery after them
    assert len(found.warnings) == 1 and "task.calibration is not set" in found.warnings[0]
    assert not (tmp_path / "run").exists()  # a check, not a study


def test_validate_refuses_budgets_no_model_in_the_space_meets(tmp_path):
    data = study_config(tmp_path, budgets={"max_size_mb": 0.000_01})
    config = load_config(write_yaml(tmp_path / "study.yaml", data))
    with pytest.raises(UserError, match="budgets.max_size_mb: no model in this space"):
        validate(config)


def test_the_executors_capacity_is_said_and_a_count_past_it_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray, not a cluster's

    def config(**compute):
        data = study_config(tmp_path, compute=compute)
        return load_config(write_yaml(tmp_path / "study.yaml", data))

    assert evaluator_capacity(config(workers=0), "inprocess") == ""
    said = evaluator_capacity(config(workers=2, executor="inprocess"), "inprocess")
    assert said == "the in-process executor evaluates one at a time"
    assert evaluator_capacity(config(workers="auto"), "ray").startswith("a local Ray: at most")
    with pytest.raises(UserError, match="compute.workers: 100,000 evaluators cannot start"):
        evaluator_capacity(config(workers=100_000), "ray")
