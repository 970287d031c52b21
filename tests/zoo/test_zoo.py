"""Models nobody here wrote, as a user would bring them: each validates with knobs on at least
90% of its parameters, searches 12 trials with no failed trial, finds a model within the
budget at least 1.5x smaller than the fp32 artifact, and that model's metric reproduces from
its exported file and from its ``torch.export`` program.

torchvision's models need ``AUTOSQUEEZE_TEST_TORCHVISION``: a folder holding torchvision
(``pip install --no-deps --target DIR torchvision==0.28.0 pillow``; ``.ci/run`` makes one).
The registries here carry only its CUDA build, whose compiled operators fail to load beside a
CPU torch and then break ``import transformers`` in any process that can see it, so it stays
out of the virtual environment and its models' commands run in a child process that puts the
folder on its path behind the zoo's shim (``zoo_models._torchvision``). Under CI a missing
folder is a failure, not a skip."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, write_yaml

from autosqueeze.cli import main
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study

pytest.importorskip("transformers")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from zoo_models import TORCHVISION, ZOO  # noqa: E402

pytestmark = [pytest.mark.zoo, pytest.mark.slow]
TORCHVISION_DIR = os.environ.get("AUTOSQUEEZE_TEST_TORCHVISION")

Command = Callable[[list[str]], tuple[int, str, str]]
"""``autosqueeze ARGS`` -> exit status, standard output, standard error."""

BEHIND_THE_SHIM = """
import sys
sys.path[:0] = sys.argv[1:3]
import zoo_models
zoo_models._torchvision()
from autosqueeze.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _in_process(capsys: pytest.CaptureFixture[str]) -> Command:
    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _beside_torchvision(args: list[str]) -> tuple[int, str, str]:
    """The command in a child process that sees torchvision (see the module's docstring)."""
    child = [sys.executable, "-c", BEHIND_THE_SHIM, TORCHVISION_DIR, str(HERE), *args]
    done = subprocess.run(child, capture_output=True, text=True, timeout=3600, check=False)
    return done.returncode, done.stdout, done.stderr


def _space(name: str) -> str:
    return ZOO.get(name) or TORCHVISION[name]


@pytest.mark.parametrize("name", list(ZOO))
def test_a_library_model_validates_searches_and_reproduces(tmp_path, capsys, name):
    _validates_searches_and_reproduces(tmp_path, name, _in_process(capsys))


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_a_torchvision_model_validates_searches_and_reproduces(tmp_path, name):
    if not TORCHVISION_DIR:
        if os.environ.get("CI"):
            pytest.fail("CI must provide torchvision in AUTOSQUEEZE_TEST_TORCHVISION (.ci/run)")
        pytest.skip("set AUTOSQUEEZE_TEST_TORCHVISION to a folder holding torchvision")
    _validates_searches_and_reproduces(tmp_path, name, _beside_torchvision)


def _validates_searches_and_reproduces(tmp_path: Path, name: str, autosqueeze: Command) -> None:
    config = write_yaml(
        tmp_path / "study.yaml",
        {
            "name": name,
            "model": {"factory": f"zoo_models:build_{name}"},
            "task": {"data": f"zoo_models:data_{name}", "metric": "fidelity"},
            "space": str(REPO / "search_spaces" / _space(name)),
            # torch: an ONNX export per trial would add minutes per model to CI; the zoo under
            # the default (auto: ONNX Runtime) is benchmarks/zoo.py --runtime auto
            "budgets": {"max_metric_drop": 0.02, "device": "cpu", "runtime": "torch"},
            "measure": {"warmup": 1, "repeats": 3},
            "search": {"trials": 12, "seed": 0, "output_dir": str(tmp_path / "run")},
            "compute": {"workers": 0},
        },
    )
    code, shown, err = autosqueeze(["validate", str(config)])
    assert code == 0, err
    reach = re.search(r"knobs reach [\d,]+ of [\d,]+ parameters \((\d+)%\)", shown)
    assert reach and int(reach.group(1)) >= 90, shown

    code, _, err = autosqueeze(["search", str(config), "--no-progress"])
    assert code == 0, err
    study = open_study(load_config(config), create=False)
    assert not [t.number for t in study.trials if t.state.name == "FAIL"]
    with open(tmp_path / "run" / "front.csv") as f:
        front = [row for row in csv.DictReader(f) if row["feasible"] == "True"]
    best = max(front, key=lambda row: float(row["compression"]))
    assert float(best["compression"]) >= 1.5, front

    artifact = tmp_path / "run" / best["artifact"]
    code, out, err = autosqueeze(["evaluate", str(config), "--artifact", str(artifact), "--json"])
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["metric"] == pytest.approx(float(best["metric"]), abs=1e-3)
    assert got["size_bytes"] == int(best["size_bytes"])

    # shipped as a torch.export program: the smallest front model whose kernels trace
    # (a packed int8-dynamic Linear does not: ``export`` refuses it by name)
    program = tmp_path / "model.pt2"
    for row in sorted(front, key=lambda row: -float(row["compression"])):
        export = ["export", str(config), "--trial", row["trial"], "--format", "pt2"]
        code, _, err = autosqueeze([*export, "-o", str(program)])
        if code == 0:
            break
        assert "ship the artifact, or a trial without it" in err, err
    else:
        pytest.fail(f"no front model of {name} exported as a program")
    evaluate = ["evaluate", str(config), "--artifact", str(program), "--json", "--trust-pickle"]
    code, out, err = autosqueeze(evaluate)
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["metric"] == pytest.approx(float(row["metric"]), abs=1e-3), row
