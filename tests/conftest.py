"""Shared fixtures: study configs for the built-in digits model, written into tmp folders."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = REPO / "search_spaces" / "default.yaml"


def study_config(folder: Path, **overrides: Any) -> dict[str, Any]:
    """A digits-CNN study whose outputs go into ``folder``; fast latency, in-process."""
    config: dict[str, Any] = {
        "name": "digits-test",
        "model": {"factory": "autosqueeze.examples.digits:pretrained_cnn"},
        "task": {"data": "autosqueeze.examples.digits:loaders", "metric": "accuracy"},
        "space": str(DEFAULT_SPACE),
        "budgets": {"max_metric_drop": 0.02, "max_size_mb": 0.4, "device": "cpu"},
        "measure": {"warmup": 2, "repeats": 5},
        "search": {"trials": 8, "seed": 0, "output_dir": str(folder / "run")},
        "compute": {"workers": 0},  # in-process; the Ray tests ask for workers explicitly
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def make_config(tmp_path: Path):
    """``make_config(**overrides) -> Path`` of a config file in a tmp folder."""

    def make(**overrides: Any) -> Path:
        return write_yaml(tmp_path / "study.yaml", study_config(tmp_path, **overrides))

    return make


SLOW_METRIC = (
    "import time\nfrom autosqueeze.metrics import accuracy\n"
    "def metric(model, data, device):\n"
    "    time.sleep(0.4)\n    return accuracy(model, data, device)\n"
)


def stop_midway(
    args: list[str], trials_now: Callable[[], list[Any]], sig: int
) -> tuple[int, bytes]:
    """Run ``autosqueeze ARGS``; once two trials are complete and one is running, send
    ``sig`` (SIGKILL: a crash; SIGINT: Ctrl-C). Returns its exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "autosqueeze", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600  # a slow, busy machine only waits longer
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            states = [t.state.name for t in trials_now()]
        except Exception:  # the study is not there yet
            continue
        if states.count("COMPLETE") + states.count("PRUNED") >= 2 and "RUNNING" in states:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err
