"""Where a study measures (``budgets.runtime``): ``auto``, the default, measures in ONNX
Runtime on a CPU where the original exports there and runs alike, in torch otherwise, and
says why; a study keeps the runtime it started in."""

from __future__ import annotations

import json

import pytest
from conftest import study_config, write_yaml

from autosqueeze.cli import main
from autosqueeze.config import load_config
from autosqueeze.errors import UserError
from autosqueeze.search import in_study_runtime, pin_runtime
from autosqueeze.study import RUNTIME, open_study
from autosqueeze.task import load_task

pytest.importorskip("onnxruntime")

NO_ONNX_MODEL = """
import torch
from torch import nn


class Spectral(nn.Module):
    # torch.linalg.eigh has no ONNX conversion
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        flat = x.flatten(1)
        values = torch.linalg.eigh(flat.T @ flat)[0][:64]
        return self.head(flat + values * 0)


def build():
    torch.manual_seed(0)
    return Spectral().eval()
"""


def _config(tmp_path, **budgets):
    config = study_config(tmp_path, budgets={"runtime": "auto", **budgets})
    return write_yaml(tmp_path / "study.yaml", config)


def _no_onnx_config(tmp_path, runtime: str):
    (tmp_path / "spectral.py").write_text(NO_ONNX_MODEL)
    config = study_config(
        tmp_path,
        model={"factory": "spectral:build"},
        budgets={"runtime": runtime, "max_size_mb": None},
    )
    return write_yaml(tmp_path / "study.yaml", config)


def test_auto_measures_in_onnx_runtime_where_the_model_ships_there(tmp_path):
    task = load_task(load_config(_config(tmp_path)))
    assert task.runtime == "onnxruntime" and task.target.runtime == "onnxruntime"
    assert "exports to ONNX and runs alike" in task.runtime_reason


def test_auto_measures_memory_in_torch(tmp_path):
    task = load_task(load_config(_config(tmp_path, max_memory_mb=5.0)))
    assert task.runtime == "torch" and "memory" in task.runtime_reason


def test_auto_falls_back_to_torch_for_a_model_that_does_not_export(tmp_path, capsys):
    """The exporter's refusal names the operator; ``auto`` measures in torch and says so,
    ``onnxruntime`` asked for is the user's error (exit 2, one line, the field named)."""
    task = load_task(load_config(_no_onnx_config(tmp_path, "auto")))
    assert task.runtime == "torch"
    assert "aten._linalg_eigh has no ONNX conversion" in task.runtime_reason
    code = main(["validate", str(tmp_path / "study.yaml"), "--json"])
    found = json.loads(capsys.readouterr().out)
    assert code == 0 and found["runtime"]["runtime"] == "torch"
    code = main(["validate", str(_no_onnx_config(tmp_path, "onnxruntime"))])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "budgets.runtime: onnxruntime" in err and "aten._linalg_eigh" in err


def test_runtime_on_the_command_line_wins_and_is_checked_against_the_budgets(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["validate", str(path), "--runtime", "torch"]) == 0
    assert "runtime   torch (set in budgets.runtime)" in capsys.readouterr().out
    path = _config(tmp_path, max_memory_mb=5.0)
    assert main(["validate", str(path), "--runtime", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert "--runtime onnxruntime: max_memory_mb" in err and "Traceback" not in err


def test_a_study_keeps_the_runtime_it_started_in(tmp_path):
    """Recorded on the study when it starts; resumed under ``auto`` (after an upgrade made
    auto the default, or with ONNX Runtime removed) it measures where it did, and a runtime
    set otherwise in the config is refused, naming both."""
    config = load_config(_config(tmp_path))
    task = load_task(config)
    study = open_study(config, create=True)
    assert pin_runtime(study, task).runtime == "onnxruntime"
    assert study.user_attrs[RUNTIME] == "onnxruntime"
    study.set_user_attr(RUNTIME, "torch")  # as if it had started in torch
    kept = in_study_runtime(study, task)
    assert kept.runtime == "torch" and "kept on resume" in kept.runtime_reason
    asked = load_task(config.with_overrides(runtime="onnxruntime"))
    with pytest.raises(UserError, match="was measured in torch; set runtime: torch"):
        in_study_runtime(study, asked)
