"""Models nobody here wrote, as a user would bring them: each validates with knobs on at least
90% of its parameters, searches 12 trials with no failed trial, finds a model within the
budget at least 1.5x smaller than the fp32 artifact, and that model's metric reproduces from
its exported file."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_yaml

from autosqueeze.cli import main
from autosqueeze.config import load_config
from autosqueeze.study import open_study

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from zoo_models import ZOO  # noqa: E402

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", list(ZOO))
def test_a_library_model_validates_searches_and_reproduces(tmp_path, capsys, name):
    config = write_yaml(
        tmp_path / "study.yaml",
        {
            "name": name,
            "model": {"factory": f"zoo_models:build_{name}"},
            "task": {"data": f"zoo_models:data_{name}", "metric": "fidelity"},
            "space": str(REPO / "search_spaces" / ZOO[name]),
            "budgets": {"max_metric_drop": 0.02, "device": "cpu"},
            "measure": {"warmup": 1, "repeats": 3},
            "search": {"trials": 12, "seed": 0, "output_dir": str(tmp_path / "run")},
            "compute": {"workers": 0},
        },
    )
    assert main(["validate", str(config)]) == 0
    shown = capsys.readouterr().out
    reach = re.search(r"knobs reach [\d,]+ of [\d,]+ parameters \((\d+)%\)", shown)
    assert reach and int(reach.group(1)) >= 90, shown

    assert main(["search", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    study = open_study(load_config(config), create=False)
    assert not [t.number for t in study.trials if t.state.name == "FAIL"]
    with open(tmp_path / "run" / "front.csv") as f:
        front = [row for row in csv.DictReader(f) if row["feasible"] == "True"]
    best = max(front, key=lambda row: float(row["compression"]))
    assert float(best["compression"]) >= 1.5, front

    artifact = tmp_path / "run" / best["artifact"]
    assert main(["evaluate", str(config), "--artifact", str(artifact), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["metric"] == pytest.approx(float(best["metric"]), abs=1e-3)
    assert got["size_bytes"] == int(best["size_bytes"])
