"""How much the stored latency of one model varies from trial to trial.

    python benchmarks/latency_stability.py [CONFIG ...] [--trials 16] [--workers 2]
        [--threads N] [--busy K]

Each config is searched over a space with nothing to choose (every layer stored int8, its
kernel fixed), so every trial evaluates the same plan; the default executor runs them (Ray,
``--workers`` evaluators on this host). ``--busy K`` runs K spinning processes beside the
search (another user's job); ``--threads`` overrides ``measure.threads``. Prints, per config,
the coefficient of variation (stdev / mean) of the stored latency (the side-by-side speedup
applied to the study's robust reference), of the raw timing of the model alone, and of the
original's timings, with how many timings were taken again as disturbed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [REPO / "studies" / "digits-cnn.yaml", REPO / "studies" / "minilm.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--busy", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(
        "| model | threads | busy | trials | CV stored latency | CV model alone | "
        "CV original | retimed |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for config in args.configs:
        print(row(config, args), flush=True)


def row(path: Path, args: argparse.Namespace) -> str:
    import optuna

    from autosqueeze.searching.search import run_search
    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.records import records

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        space = Path(folder) / "fixed.yaml"
        space.write_text(
            yaml.safe_dump(
                {"rules": [{"types": ["Linear", "Conv2d", "Embedding"], "knobs": {"bits": 8}}]}
            )
        )
        config = load_config(path).with_overrides(
            trials=args.trials, study_dir=Path(folder), workers=args.workers
        )
        measure = config.measure.model_copy(update={"threads": args.threads})
        budgets = config.budgets.model_copy(update={"max_metric_drop": None, "max_size_mb": None})
        config = config.model_copy(update={"space": space, "measure": measure, "budgets": budgets})
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
        ]
        try:
            result = run_search(config, progress=False)
        finally:
            for p in spinners:
                p.kill()
        trials = result.study.get_trials(deepcopy=False)
        done = [r for r in records(result.study) if r.state == "COMPLETE"]
        stored = [r.measurements.latency_ms for r in done]
        alone = [t.user_attrs["measured_latency_ms"] for t in trials if t.state.name == "COMPLETE"]
        original = [
            t.user_attrs["reference_latency_ms"] for t in trials if t.state.name == "COMPLETE"
        ]
        retimed = sum(1 for t in trials if (t.user_attrs.get("timing_attempts") or 1) > 1)
    threads = args.threads or "all"
    return (
        f"| {config.name} | {threads} | {args.busy} | {len(done)} | {cv(stored):.1%} | "
        f"{cv(alone):.1%} | {cv(original):.1%} | {retimed} |"
    )


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
