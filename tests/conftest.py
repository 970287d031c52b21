"""Shared fixtures: study configs for the built-in digits model, written into tmp folders."""

from __future__ import annotations

import os
import signal
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


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own cache folder (layer timings): none reads another's, or the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("AUTOSQUEEZE_CACHE_DIR", str(folder))
    return folder


def study_config(folder: Path, **overrides: Any) -> dict[str, Any]:
    """A digits-CNN study whose outputs go into ``folder``; fast latency, in-process."""
    config: dict[str, Any] = {
        "name": "digits-test",
        "model": {"factory": "autosqueeze.examples.digits:pretrained_cnn"},
        "task": {"data": "autosqueeze.examples.digits:loaders", "metric": "accuracy"},
        "space": str(DEFAULT_SPACE),
        # torch: the default (auto) measures in ONNX Runtime, an export per trial; the tests
        # of that path ask for it (tests/test_runtime.py, test_onnx_forms, test_export_onnx)
        "budgets": {
            "max_metric_drop": 0.02,
            "max_size_mb": 0.4,
            "device": "cpu",
            "runtime": "torch",
        },
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
    "import time\nfrom autosqueeze.usercode.metrics import accuracy\n"
    "def metric(model, data, device):\n"
    "    time.sleep(0.4)\n    return accuracy(model, data, device)\n"
)


GATED_METRIC = (
    "import os, time\nfrom pathlib import Path\nfrom autosqueeze.usercode.metrics import accuracy\n"
    "GATE = Path(__file__).resolve().with_suffix('.gate')\n"
    "def metric(model, data, device):\n"
    "    GATE.mkdir(exist_ok=True)\n"
    "    n = 0\n"
    "    while True:  # claim the next call number, across processes\n"
    "        try:\n"
    "            os.close(os.open(GATE / f'call-{n}', os.O_CREAT | os.O_EXCL))\n"
    "            break\n"
    "        except FileExistsError:\n"
    "            n += 1\n"
    "    if not (GATE / 'open').exists():\n"
    "        (GATE / f'wait-{n}').touch()\n"
    "        while not (GATE / f'allow-{n}').exists() and not (GATE / 'open').exists():\n"
    "            time.sleep(0.05)\n"
    "    return accuracy(model, data, device)\n"
)
"""A metric each of whose calls waits for ``stop_midway`` to let it through (the gate is the
folder ``<module>.gate`` beside the module file), so a test, not the machine's speed, decides
what has happened when the signal is sent."""


def stop_midway(
    args: list[str], trials_now: Callable[[], list[Any]], sig: int, gate: Path
) -> tuple[int, bytes]:
    """Run ``autosqueeze ARGS``, its metric being ``GATED_METRIC`` with folder ``gate``. Metric
    calls are let through one at a time until two trials are finished and one is RUNNING with
    its metric call held; then ``sig`` is sent (SIGKILL: a crash; SIGINT: Ctrl-C) and the
    gate opened for good. Returns the exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "autosqueeze", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so a search that outlives the test can be killed, Ray too
        # a test run started in the background (as CI starts it) inherits SIGINT ignored,
        # and a search started that way rightly keeps ignoring Ctrl-C: this one is a
        # foreground search, as a user's in a terminal is
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    allowed: set[str] = set()
    deadline = time.monotonic() + 900  # a search that stalls fails the test, never hangs it
    while proc.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"the search stalled: {proc.communicate()[1][-2000:]!r}")
        time.sleep(0.1)
        held = sorted(
            (int(p.name.split("-")[1]) for p in gate.glob("wait-*") if p.name not in allowed),
        )
        if not held:
            continue  # nothing waits at the gate: the search is computing
        try:
            states = [t.state.name for t in trials_now()]
        except Exception:  # noqa: BLE001 - the study is not there yet
            states = []
        if states.count("COMPLETE") + states.count("PRUNED") >= 2 and "RUNNING" in states:
            proc.send_signal(sig)  # a RUNNING trial is held in its metric: it cannot finish
            break
        (gate / f"allow-{held[0]}").touch()
        allowed.add(f"wait-{held[0]}")
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it ignored the signal: fail, leaving nothing behind
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(
            f"the search outlived signal {sig} by 120 s: {err[-2000:]!r}"
        ) from None
    finally:
        gate.mkdir(exist_ok=True)
        (gate / "open").touch()  # for the run that resumes (and evaluators still waiting)
    return proc.returncode, err


def tiny_gpt2() -> tuple[Any, Any, Any]:
    """A one-block GPT-2 (its projections Hugging Face's Conv1D, 32 wide), seeded and without
    dropout, its config and two 16-token sentences: ``(model, config, ids)``."""
    import torch

    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, config, ids
