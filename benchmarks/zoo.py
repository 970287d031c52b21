"""Models nobody here wrote, searched as a user would: per architecture, its parameters, the
share of them the space can compress, and the best model within a 0.02 fidelity budget.

    python benchmarks/zoo.py [NAME ...] [--trials 24] [--workers 0] [--runtime auto]

Models: ``tests/zoo/zoo_models.py`` (torch's and transformers' classes, tiny configs, random
weights under a seed, judged by ``fidelity``), plus torchvision's where torchvision imports
(name them, e.g. ``PYTHONPATH=/tmp/tv python benchmarks/zoo.py resnet18``, with a torchvision
installed apart: its CUDA-only wheel breaks ``import transformers`` beside a CPU torch).
Each runs ``autosqueeze validate`` and ``autosqueeze search`` in a fresh process on a fresh
study in a temporary folder, in-process by default (``--workers``). Columns: parameters;
knobs' reach (share of parameters with knobs, from ``validate``); the runtime measured in
(``budgets.runtime``, default auto: ONNX Runtime where the model exports there); failed
trials; the smallest model within budget (size / fp32 artifact) and the fastest (speedup
timed beside the original); wall seconds of the search; and whether the smallest model
reproduces from its file (``autosqueeze evaluate``: the metric's difference, and its bytes).
Prints one markdown table (kept in docs/results.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ZOO_DIR = REPO / "tests" / "zoo"
sys.path.insert(0, str(ZOO_DIR))
from zoo_models import TORCHVISION, ZOO  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto")
    args = parser.parse_args()
    models = {**ZOO, **TORCHVISION}
    if not args.names:
        models = {**ZOO, **(TORCHVISION if _torchvision_imports() else {})}
    names = args.names or list(models)
    print(
        "| model | space | parameters | knobs reach | runtime | trials failed | smallest within "
        "budget | fastest within budget | search s | reproduced from the file |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---|")
    for name in names:
        print(_row(name, models[name], args.trials, args.workers, args.runtime), flush=True)


def _row(name: str, space: str, trials: int, workers: int, runtime: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "study.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "model": {"factory": f"zoo_models:build_{name}"},
                    "task": {"data": f"zoo_models:data_{name}", "metric": "fidelity"},
                    "space": str(REPO / "search_spaces" / space),
                    "budgets": {"max_metric_drop": 0.02, "device": "cpu", "runtime": runtime},
                    "search": {"trials": trials, "seed": 0, "output_dir": f"{folder}/run"},
                    "compute": {"workers": workers},
                }
            )
        )
        validate = _autosqueeze("validate", config)
        params = re.search(r"knobs reach [\d,]+ of ([\d,]+) parameters \((\d+)%\)", validate)
        measured_in = re.search(r"^runtime +(\S+)", validate, re.MULTILINE)
        start = time.monotonic()
        _autosqueeze("search", config, "--no-progress")
        seconds = time.monotonic() - start
        from autosqueeze.settings.config import load_config
        from autosqueeze.studies.study import open_study

        study = open_study(load_config(config), create=False)
        failed = sum(t.state.name == "FAIL" for t in study.trials)
        with open(Path(folder) / "run" / "front.csv") as f:
            front = [row for row in csv.DictReader(f) if row["feasible"] == "True"]
        reproduced = _reproduced(config, Path(folder) / "run", front)
    smallest = max((float(r["compression"]) for r in front), default=1.0)
    fastest = max((float(r["speedup"]) for r in front), default=1.0)
    reach = f"{params.group(2)}%" if params else "?"
    total = params.group(1) if params else "?"
    return (
        f"| {name} | {space} | {total} | {reach} | {measured_in.group(1) if measured_in else '?'} "
        f"| {failed} | {smallest:.1f}x | {fastest:.2f}x "
        f"| {seconds:.0f} | {reproduced} |"
    )


def _reproduced(config: Path, run: Path, front: list[dict[str, str]]) -> str:
    """The smallest front model measured again from its file: metric difference, bytes."""
    if not front:
        return "-"
    best = max(front, key=lambda r: float(r["compression"]))
    out = _autosqueeze("evaluate", config, "--artifact", run / best["artifact"], "--json")
    got = json.loads(out.strip().splitlines()[-1])
    diff = abs(got["metric"] - float(best["metric"]))
    same = "same bytes" if got["size_bytes"] == int(best["size_bytes"]) else "OTHER BYTES"
    return f"metric within {diff:.0e}, {same}"


def _autosqueeze(*args: object) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "autosqueeze", *map(str, args)],
        capture_output=True,
        text=True,
        env=_ENV,
    )
    if done.returncode != 0:
        raise SystemExit(f"autosqueeze {args[0]} failed:\n{done.stderr}")
    return done.stdout


# the zoo's folder first; a PYTHONPATH given to this script follows (e.g. a folder holding a
# torchvision that must stay out of the environment's own site-packages)
_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ZOO_DIR), os.environ.get("PYTHONPATH")])),
}


def _torchvision_imports() -> bool:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "import zoo_models; zoo_models.build_resnet18()",
            str(ZOO_DIR),
        ],
        capture_output=True,
        env=_ENV,
    )
    return probe.returncode == 0


if __name__ == "__main__":
    main()
