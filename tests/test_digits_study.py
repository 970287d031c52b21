"""The built-in example keeps its promise: >= 8x smaller within 1% accuracy, default settings.

CI's install step runs this very study (the README's first search) and names its folder in
``AUTOSQUEEZE_TEST_FIRST_SEARCH``: the test then reads that run, so CI proves the README's own
run without searching twice; elsewhere it runs the study itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO

from autosqueeze.results.front import compute_front
from autosqueeze.searching.search import run_search
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study


@pytest.mark.slow
def test_default_digits_study_finds_an_8x_smaller_model_within_one_point(tmp_path):
    config = load_config(REPO / "studies" / "digits-cnn.yaml")
    first_search = os.environ.get("AUTOSQUEEZE_TEST_FIRST_SEARCH")
    if first_search:  # the README's own run, as CI's install step left it
        study = open_study(config.with_overrides(study_dir=Path(first_search)), create=False)
        assert len(study.trials) == config.search.trials
        front = compute_front(study, config.objectives)
    else:
        front = run_search(config.with_overrides(study_dir=tmp_path), progress=False).front
    ref = front.reference
    assert ref is not None and ref.metric > 0.97
    within = [m.measurements for m in front.members if ref.metric - m.measurements.metric <= 0.01]
    assert within, "no front model within 1% of the original"
    smallest = min(m.size_bytes for m in within)
    assert ref.size_bytes / smallest >= 8.0, f"only {ref.size_bytes / smallest:.1f}x smaller"
