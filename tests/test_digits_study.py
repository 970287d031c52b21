"""The built-in example keeps its promise: >= 8x smaller within 1% accuracy, default settings."""

from __future__ import annotations

import pytest
from conftest import REPO

from autosqueeze.searching.search import run_search
from autosqueeze.settings.config import load_config


@pytest.mark.slow
def test_default_digits_study_finds_an_8x_smaller_model_within_one_point(tmp_path):
    config = load_config(REPO / "studies" / "digits-cnn.yaml").with_overrides(study_dir=tmp_path)
    result = run_search(config, progress=False)
    ref = result.front.reference
    assert ref is not None and ref.metric > 0.97
    within = [
        m.measurements for m in result.front.members if ref.metric - m.measurements.metric <= 0.01
    ]
    assert within, "no front model within 1% of the original"
    smallest = min(m.size_bytes for m in within)
    assert ref.size_bytes / smallest >= 8.0, f"only {ref.size_bytes / smallest:.1f}x smaller"
