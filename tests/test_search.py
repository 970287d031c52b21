"""``run_search`` called from Python refuses what the command refuses, before any study."""

from __future__ import annotations

import pytest
from conftest import study_config, write_yaml

from autosqueeze import UserError, load_config, run_search


def test_a_search_no_model_can_satisfy_is_refused_before_the_study_is_created(tmp_path):
    data = study_config(tmp_path, budgets={"max_size_mb": 0.000_01})
    config = load_config(write_yaml(tmp_path / "study.yaml", data))
    with pytest.raises(UserError, match="budgets.max_size_mb: no model in this space"):
        run_search(config, progress=False)
    assert not (tmp_path / "run").exists()  # the study's folder: no journal, no front


def test_the_smoothed_int8_start_waits_for_calibration_batches(tmp_path):
    """Smoothing's input ranges from the example input alone cost MiniLM fidelity at every
    alpha, so the warm start that smooths is queued only where the study calibrates."""
    from autosqueeze.searching.search import ORT_STARTS, _calibrated_enough

    smoothed = [name for name in ORT_STARTS if "smoothed" in name]
    assert smoothed
    plain = load_config(write_yaml(tmp_path / "plain.yaml", study_config(tmp_path)))
    calibrated = load_config(
        write_yaml(
            tmp_path / "calibrated.yaml",
            study_config(tmp_path, task={"calibration": "autosqueeze.examples.digits:calibration"}),
        )
    )
    assert not any(_calibrated_enough(name, plain) for name in smoothed)
    assert all(_calibrated_enough(name, calibrated) for name in smoothed)
    assert _calibrated_enough("ort-int8-dynamic", plain)
