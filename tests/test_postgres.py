"""The study in PostgreSQL: a search is interrupted, then resumed from the database.

Needs a server: ``AUTOSQUEEZE_TEST_POSTGRES=postgresql://...``; ``.ci/run`` starts one on
loopback (``.ci/postgres.sh``). Under CI a missing server is a failure, not a skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import optuna
import pytest
from conftest import GATED_METRIC, stop_midway

pytestmark = pytest.mark.slow  # a real PostgreSQL: python -m pytest -m slow

URL = os.environ.get("AUTOSQUEEZE_TEST_POSTGRES")

if not URL and not os.environ.get("CI"):
    pytest.skip(
        "set AUTOSQUEEZE_TEST_POSTGRES to a PostgreSQL URL (.ci/run starts one)",
        allow_module_level=True,
    )


def test_search_interrupted_and_resumed_from_postgres(tmp_path, make_config):
    assert URL, "CI must provide PostgreSQL in AUTOSQUEEZE_TEST_POSTGRES (see .ci/run)"
    (tmp_path / "gated_metric_pg.py").write_text(GATED_METRIC)
    name = f"pg-{uuid.uuid4().hex[:12]}"  # the server outlives test runs
    config = make_config(
        name=name, task={"metric": "gated_metric_pg:metric"}, search={"trials": 6, "storage": URL}
    )

    def trials_now():
        return optuna.load_study(study_name=name, storage=URL).trials

    code, err = stop_midway(  # the trials' resume: the pass's own is in test_sensitivity
        ["search", str(config), "--no-progress", "--no-sensitivity"],
        trials_now,
        signal.SIGKILL,
        tmp_path / "gated_metric_pg.gate",
    )
    assert code == -signal.SIGKILL
    assert "RUNNING" in [t.state.name for t in trials_now()]  # the killed run's trial
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "autosqueeze",
            "search",
            str(config),
            "--no-progress",
            "--no-sensitivity",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    trials = trials_now()
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 6
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and "interrupted" in failed[0].user_attrs["fail_reason"]
    assert not (tmp_path / "run" / "study.log").exists()  # nothing went to the default file
    front = subprocess.run(
        [sys.executable, "-m", "autosqueeze", "front", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert front.returncode == 0 and '"front"' in front.stdout
