"""Compare autosqueeze's Optuna samplers on the built-in ``studies/digits-cnn.yaml`` study.

For every sampler in ``autosqueeze.studies.samplers.SAMPLERS`` and every seed, this runs a fresh
search (a new SQLite study in a temporary folder; the task is loaded once and reused) and
measures, over the run's feasible trials (complete and within every budget):

- hypervolume in a normalized minimization space: metric drop vs the uncompressed model
  (clipped to [0, 0.01]), size / original size, latency / original latency (clipped to at
  most 1.5), with reference point (0.01, 1.0, 1.5), so only models smaller than the
  original count. Larger is better.
- the same hypervolume on (metric drop, size ratio) alone, reference (0.01, 1.0): latency on a
  0.1 ms model is noisy on a shared 2-core machine, and this one is what ranks samplers reliably,
- the smallest artifact (bytes) among feasible trials with metric drop <= 0.01,
- the number of feasible trials, and the wall seconds of the run.

Run it from the repository root (defaults: 150 trials, seeds 0 1 2, every sampler)::

    python benchmarks/samplers.py
    python benchmarks/samplers.py --trials 50 --seeds 0 1 --samplers tpe random

Latency is measured wall time, so hypervolumes vary a little between machines and runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autosqueeze.measuring.measure import Measurements
from autosqueeze.problem.task import Task, load_task
from autosqueeze.results.front import hypervolume
from autosqueeze.searching.search import run_search
from autosqueeze.settings.config import StudyConfig, load_config
from autosqueeze.studies.records import records, reference
from autosqueeze.studies.samplers import SAMPLERS

CONFIG = Path(__file__).resolve().parent.parent / "studies" / "digits-cnn.yaml"
MAX_DROP = 0.01
MAX_LATENCY_RATIO = 1.5
REFERENCE_POINT = np.array([MAX_DROP, 1.0, MAX_LATENCY_RATIO])


@dataclass(frozen=True)
class RunResult:
    sampler: str
    seed: int
    hypervolume: float
    hypervolume_metric_size: float
    smallest: int | None  # bytes; None when no feasible trial keeps the drop <= MAX_DROP
    feasible: int
    seconds: float


def normalize(got: Measurements, ref: Measurements) -> list[float]:
    """A trial as (metric drop, size ratio, latency ratio), all to be minimized."""
    drop = min(max(ref.metric - got.metric, 0.0), MAX_DROP)
    latency = min(got.latency_ms / ref.latency_ms, MAX_LATENCY_RATIO)
    return [drop, got.size_bytes / ref.size_bytes, latency]


def run_one(base: StudyConfig, task: Task, sampler: str, seed: int, trials: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix=f"samplers-{sampler}-{seed}-") as folder:
        config = base.with_overrides(trials=trials, study_dir=Path(folder))
        search = config.search.model_copy(update={"sampler": sampler, "seed": seed})
        config = config.model_copy(update={"search": search})
        start = time.perf_counter()
        result = run_search(config, progress=False, task=task)
        seconds = time.perf_counter() - start
        ref = reference(result.study)
        assert ref is not None, "run_search stores the reference measurements on the study"
        feasible = [r.measurements for r in records(result.study) if r.feasible and r.measurements]
    points = np.array([normalize(m, ref) for m in feasible]).reshape(-1, 3)
    sizes = [m.size_bytes for m in feasible if ref.metric - m.metric <= MAX_DROP]
    return RunResult(
        sampler=sampler,
        seed=seed,
        hypervolume=hypervolume(points.tolist(), REFERENCE_POINT.tolist()),
        hypervolume_metric_size=hypervolume(points[:, :2].tolist(), REFERENCE_POINT[:2].tolist()),
        smallest=min(sizes) if sizes else None,
        feasible=len(feasible),
        seconds=seconds,
    )


def _mean_std(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def summary_table(results: list[RunResult], samplers: list[str]) -> str:
    lines = [
        "| sampler | seeds | mean HV (± std) | mean HV metric+size (± std) "
        "| mean smallest feasible size (bytes) | mean feasible trials | mean seconds per run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in samplers:
        runs = [r for r in results if r.sampler == name]
        sizes = [r.smallest for r in runs if r.smallest is not None]
        size = f"{statistics.mean(sizes):,.0f}" if sizes else "n/a"
        if sizes and len(sizes) < len(runs):
            size += f" ({len(sizes)}/{len(runs)} runs)"
        lines.append(
            f"| {name} | {len(runs)} | {_mean_std([r.hypervolume for r in runs], 6)} "
            f"| {_mean_std([r.hypervolume_metric_size for r in runs], 6)} | {size} "
            f"| {statistics.mean(r.feasible for r in runs):.1f} "
            f"| {statistics.mean(r.seconds for r in runs):.1f} |"
        )
    return "\n".join(lines)


def runs_table(results: list[RunResult]) -> str:
    lines = [
        "| sampler | seed | HV | HV metric+size | smallest feasible size (bytes) "
        "| feasible trials | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        size = f"{r.smallest:,}" if r.smallest is not None else "n/a"
        lines.append(
            f"| {r.sampler} | {r.seed} | {r.hypervolume:.6f} | {r.hypervolume_metric_size:.6f} "
            f"| {size} | {r.feasible} "
            f"| {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150, help="trials per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--config", type=Path, default=CONFIG, help="study config to search")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = load_config(args.config)
    task = load_task(base)
    results = []
    for name in args.samplers:
        for seed in args.seeds:
            result = run_one(base, task, name, seed, args.trials)
            print(
                f"{name} seed {seed}: HV {result.hypervolume:.6f}, {result.seconds:.1f} s",
                flush=True,
            )
            results.append(result)
    print(f"\n{args.trials} trials per run on {args.config.name}\n")
    print(summary_table(results, args.samplers))
    print()
    print(runs_table(results))


if __name__ == "__main__":
    main()
