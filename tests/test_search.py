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
