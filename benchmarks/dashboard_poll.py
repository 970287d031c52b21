"""How long the dashboard takes to answer a poll on a large study.

    python benchmarks/dashboard_poll.py [--trials 1000] [--config studies/digits-cnn.yaml]

Writes a synthetic study of ``--trials`` finished trials into a temporary journal file: plans
drawn at random from the config's space, measurements shaped like real ones (two thirds
complete with a speedup and a side-by-side reference timing, one third pruned before timing),
the budgets as constraints. Then times what the dashboard does on each 2-second poll
(``StudyReader.view`` plus the JSON it sends): the first poll (nothing cached), a poll with
nothing new, and a poll after one more trial. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from autosqueeze.problem.task import load_task
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import PLAN, REFERENCE, constraints, objective_values, open_study
from autosqueeze.views.study_view import StudyReader

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--config", type=Path, default=REPO / "studies" / "digits-cnn.yaml")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(args.config).with_overrides(study_dir=Path(folder))
        task = load_task(config)
        space = build_space(task.model, config.space, task.target)
        study = open_study(config, create=True)
        study.sampler = optuna.samplers.RandomSampler(seed=0)
        original = {"metric": 0.98, "size_bytes": 755_344, "latency_ms": 0.5, "memory_mb": 0.85}
        study.set_user_attr(REFERENCE, {**original, "reference_latency_ms": 0.5, "speedup": 1.0})
        ref = load_reference(study)
        rng = random.Random(0)
        start = time.perf_counter()
        for _ in range(args.trials):
            add_trial(study, config, space, ref, rng)
        written = time.perf_counter() - start
        reader = StudyReader(config, args.config)
        rows = [("write the study (not a poll)", written)]
        start = time.perf_counter()
        reader.open()
        rows.append(
            (
                "open it: Optuna replays the journal (once, at server start)",
                time.perf_counter() - start,
            )
        )
        rows.append(("first poll (nothing cached)", poll(reader)))
        rows.append(("poll, nothing new", poll(reader)))
        add_trial(study, config, space, ref, rng)
        rows.append(("poll after one more trial", poll(reader)))
        size = len(json.dumps(reader.view()))
    print(f"{args.trials} trials of {config.name}, {len(space.layers)} layers a plan")
    print(f"JSON sent per poll: {size / 1e6:.2f} MB\n")
    print("| step | seconds |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")


def load_reference(study: optuna.Study):
    from autosqueeze.studies.records import reference

    return reference(study)


def add_trial(study, config, space, ref, rng: random.Random) -> None:
    from autosqueeze.measuring.measure import Measurements

    trial = study.ask(space.distributions)
    plan = space.plan(trial.params)
    trial.set_user_attr(PLAN, plan.to_json())
    metric = ref.metric - abs(rng.gauss(0, 0.03))
    size = int(ref.size_bytes / rng.uniform(1, 60))
    if rng.random() < 1 / 3:
        got = Measurements(metric, size, None, stopped="metric below the budget")
    else:
        speedup = rng.uniform(0.7, 2.0)
        reference_ms = ref.latency_ms * rng.uniform(0.9, 1.2)
        got = Measurements(
            metric, size, reference_ms / speedup, rng.uniform(0.1, 0.9), reference_ms, speedup
        )
    for key, value in got.to_dict().items():
        trial.set_user_attr(key, value)
    for key, value in constraints(config, ref, got).items():
        trial.set_constraint(key, value)
    if got.stopped:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, objective_values(config, got))


def poll(reader: StudyReader) -> float:
    start = time.perf_counter()
    json.dumps(reader.view())
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
