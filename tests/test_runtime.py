"""Where a study measures (``budgets.runtime``): ``auto``, the default, measures in ONNX
Runtime on a CPU where the original exports there and runs alike, in torch otherwise, and
says why; a study keeps the runtime it started in."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from conftest import study_config, write_yaml

from autosqueeze.cli import main
from autosqueeze.common.errors import UserError
from autosqueeze.problem.task import load_task
from autosqueeze.searching.search import in_study_runtime, pin_runtime
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import RUNTIME, open_study

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

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


def test_a_study_that_ships_to_onnx_runtime_times_its_layers_there(tmp_path):
    """The latency model's layer timings, for a study measured in ONNX Runtime: each layer
    a probe changes is exported alone, as a trial's file is (its int8 kernels in the file),
    and timed beside the original layer alone, also in ONNX Runtime; the whole model's time
    is the original's ONNX file's."""
    from autosqueeze.measuring.evaluator import Evaluator
    from autosqueeze.plans.plan import LayerPlan, Plan

    task = load_task(load_config(_config(tmp_path)))
    assert task.runtime == "onnxruntime"
    evaluator = Evaluator(task)
    try:
        layer = "classifier.1"
        args = (torch.randn(1, task.model.get_submodule(layer).in_features),)
        for kernel, integer_op in (
            ("ort_int8_dynamic", "MatMulInteger"),
            ("ort_int8_static", "QuantizeLinear"),
        ):
            alone = evaluator._alone_in_ort(layer, LayerPlan.of(kernel=kernel), args, {})
            assert alone is not None
            original, probed = (
                collections.Counter(n.op_type for n in onnx.load(str(m.path)).graph.node)
                for m in alone
            )
            assert integer_op in probed and integer_op not in original
        got = evaluator.time_probe(Plan({layer: LayerPlan.of(kernel="ort_int8_dynamic")}))
        assert got.layer_ms is not None and min(got.layer_ms) > 0
        assert got.model_ms is not None and got.model_ms > 0
    finally:
        evaluator.close()
