"""Throughput of the digits study by executor, and the driver's own cost per trial by storage.

1. Trials per minute with the in-process executor and with 1 and 2 Ray workers (each run a
   fresh study; Ray's start-up is included in the wall time and also shown apart).
2. The driver's overhead per trial after 300 trials: the storage and sampler calls the
   search loop makes for one trial (count, ask, two attributes; then measurements,
   constraints, tell, count), with measurements drawn at random instead of evaluated, for
   the journal file (the default), SQLite and in-memory storage.

    python benchmarks/scaling.py                      # both parts
    python benchmarks/scaling.py --trials 60 --overhead-trials 320
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from autosqueeze.measuring.measure import Measurements
from autosqueeze.problem.task import load_task
from autosqueeze.searching.search import run_search
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.drivers import DRIVER, finished_count, taken_count
from autosqueeze.studies.samplers import create_sampler
from autosqueeze.studies.study import PLAN, constraints, objective_values, open_study

CONFIG = Path(__file__).resolve().parent.parent / "studies" / "digits-cnn.yaml"


def throughput(workers: int, trials: int) -> tuple[float, float]:
    """(trials per minute, seconds before the first trial started: Ray's start-up)."""
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(CONFIG).with_overrides(
            trials=trials, study_dir=Path(folder), workers=workers
        )
        task = load_task(config)
        start = time.perf_counter()
        result = run_search(config, progress=False, task=task)
        wall = time.perf_counter() - start
        first = min(t.datetime_start for t in result.study.trials).timestamp()
        startup = first - (time.time() - wall)
    return 60.0 * trials / wall, max(startup, 0.0)


def driver_overhead(storage: str, trials: int) -> tuple[float, float]:
    """Mean ms per trial of the driver's study calls over the last 50 of ``trials``."""
    with tempfile.TemporaryDirectory() as folder:
        target = {
            "journal": str(Path(folder) / "study.log"),
            "sqlite": f"sqlite:///{folder}/study.db",
            "memory": None,
        }[storage]
        config = load_config(CONFIG).with_overrides(study_dir=Path(folder), storage=target)
        space = build_space(load_task(config).model, config.space)
        study = (
            open_study(config, create=True)
            if target
            else optuna.create_study(
                directions=["maximize", "minimize", "minimize"],
                sampler=create_sampler("tpe", seed=0),
            )
        )
        ref = Measurements(0.98, 755_112, 0.1)
        rng = random.Random(0)
        ask_ms, tell_ms = [], []
        for _ in range(trials):
            start = time.perf_counter()
            taken_count(study)
            trial = study.ask(space.distributions)
            trial.set_user_attr(DRIVER, "bench")
            trial.set_user_attr(PLAN, space.plan(trial.params).to_json())
            middle = time.perf_counter()
            got = Measurements(
                rng.uniform(0.9, 0.98), rng.randint(20_000, 755_112), rng.uniform(0.08, 0.2)
            )
            for key, value in got.to_dict().items():
                trial.set_user_attr(key, value)
            for key, value in constraints(config, ref, got).items():
                trial.set_constraint(key, value)
            study.tell(trial, objective_values(config, got))
            finished_count(study)
            ask_ms.append((middle - start) * 1e3)
            tell_ms.append((time.perf_counter() - middle) * 1e3)
    return statistics.mean(ask_ms[-50:]), statistics.mean(tell_ms[-50:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60, help="trials per throughput run")
    parser.add_argument("--overhead-trials", type=int, default=320)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    print(f"digits-cnn, {args.trials} trials per run\n")
    print("| executor | trials / min | after start-up | start-up s |\n|---|---:|---:|---:|")
    for workers, label in ((0, "in-process"), (1, "Ray, 1 worker"), (2, "Ray, 2 workers")):
        per_minute, startup = throughput(workers, args.trials)
        steady = args.trials / (args.trials / per_minute - startup / 60)
        print(f"| {label} | {per_minute:.0f} | {steady:.0f} | {startup:.1f} |", flush=True)

    print(f"\ndriver overhead per trial at trial {args.overhead_trials} (mean of the last 50)\n")
    print("| storage | count+ask+attrs ms | attrs+tell+count ms | total ms |\n|---|---:|---:|---:|")
    for storage in ("journal", "sqlite", "memory"):
        ask, tell = driver_overhead(storage, args.overhead_trials)
        print(f"| {storage} | {ask:.1f} | {tell:.1f} | {ask + tell:.1f} |", flush=True)


if __name__ == "__main__":
    main()
