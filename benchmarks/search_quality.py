"""How good the search is: the default (sensitivity pass, shaped space, knapsack plans, TPE)
against Optuna's TPE and RandomSampler over the whole space, at equal trial budgets.

    python benchmarks/search_quality.py [CONFIG ...] [--trials 24 60] [--modes default tpe random]
                                        [--seeds 1]

Default configs: the digits CNN, the residual CNN, a 4-layer BERT from transformers' classes
(random weights, judged by fidelity) and MiniLM. ``tpe`` and ``random`` run with the
sensitivity pass off (``sensitivity.enabled: false``): the baselines and the fixed uniform
warm starts, then the sampler over the unpruned space, as main did before. ``random-bare``
is Optuna's RandomSampler alone over the unpruned space, after the original and int8
baselines (``search.warm_starts: false``): no hand-picked anchors. Each run is a
fresh study in a temporary folder, on the config's executor (Ray, one evaluator per core).

Columns, per (model, trials, mode):
- hypervolume of the feasible trials in (metric drop, size / original, latency / original)
  from (max_metric_drop, 1, 1.5) (``autosqueeze.results.front``), larger is better;
- smallest and fastest model within every budget (bytes on disk; latency / original);
- best uniform plan within budget (the smallest of the uniform baselines and warm starts
  that any run measured) and the knapsack plans alone (the default's knapsack trials);
- the share of *sampled* trials (not queued plans) within the metric budget;
- the latency model's error: the median of |predicted - measured| / measured latency
  (relative to the original's) over the timed trials, and the share of pairs of timed
  trials it orders as measured (rank agreement);
- the sensitivity pass's seconds and the whole run's wall seconds.
Prints one markdown table (kept in docs/results.md). With ``--seeds N``, every run is made
under the study seeds 0..N-1 and a second table gives, per model, each mode's hypervolume
as a share of RandomSampler's under the same seed, and their median: one run's volume can
turn on a single lucky trial (a plan that happens to score above the original on the
validation set, or a latency timed low).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [
    REPO / "studies" / "digits-cnn.yaml",
    REPO / "studies" / "residual-cnn.yaml",
    REPO / "benchmarks" / "studies" / "bert-small.yaml",
    REPO / "studies" / "minilm.yaml",
]
MODES = {
    "default": {"sensitivity": {"enabled": True}, "search": {"sampler": "tpe"}},
    "tpe": {"sensitivity": {"enabled": False}, "search": {"sampler": "tpe"}},
    "random": {"sensitivity": {"enabled": False}, "search": {"sampler": "random"}},
    "random-bare": {
        "sensitivity": {"enabled": False},
        "search": {"sampler": "random", "warm_starts": False},
    },
}
UNIFORM = {"int8", "int6", "int4", "int6-bf16", "int8-dynamic", "int4-kernel"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--trials", nargs="+", type=int, default=[24, 60])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--workers", type=int, default=None, help="default: the config's")
    parser.add_argument("--seeds", type=int, default=1, help="study seeds 0..N-1 per run")
    args = parser.parse_args()
    rows = []
    for path in args.configs:
        rows += measure(path, args.trials, args.modes, args.workers, range(args.seeds))
        print(table(rows), flush=True)  # so far: a long run shows its progress
    print(ratios(rows), flush=True)


def measure(
    path: Path,
    trial_counts: list[int],
    modes: list[str],
    workers: int | None,
    seeds: range = range(1),
) -> list:
    import optuna

    from autosqueeze.problem.task import load_task
    from autosqueeze.settings.config import load_config

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.path.insert(0, str(path.parent))
    base = load_config(path)
    task = load_task(base)
    runs = []
    for trials in trial_counts:
        for seed in seeds:
            for mode in modes:
                with tempfile.TemporaryDirectory() as folder:
                    config = _configured(base, MODES[mode], trials, Path(folder), workers, seed)
                    start = time.monotonic()
                    result = _search(config, task)
                    seconds = time.monotonic() - start
                    runs.append(_summary(config, mode, trials, result, seconds) | {"seed": seed})
    best_uniform = {}
    for run in runs:
        key = run["trials"]
        if run["uniform"] is not None:
            best_uniform[key] = min(best_uniform.get(key, run["uniform"]), run["uniform"])
    for run in runs:
        run["best_uniform"] = best_uniform.get(run["trials"])
    return runs


def _configured(base, overrides, trials, folder, workers, seed=None):
    data = base.model_dump()
    for section, values in overrides.items():
        data[section] = {**data[section], **values}
    data["search"]["trials"] = trials
    if seed is not None:
        data["search"]["seed"] = seed
    data["search"]["output_dir"] = folder
    data["search"]["storage"] = None
    if workers is not None:
        data["compute"]["workers"] = workers
    return type(base).model_validate({**data, "source": base.source})


def _search(config, task):
    from autosqueeze.searching.search import run_search

    return run_search(config, progress=False, task=task)


def _summary(config, mode, trials, result, seconds) -> dict:
    from autosqueeze.results.front import hypervolume, normalized, reference_point
    from autosqueeze.searching.search import BASELINE, KNAPSACK
    from autosqueeze.studies.records import records

    ref = result.front.reference
    objectives = config.objectives
    drop = config.budgets.max_metric_drop
    everything = records(result.study)
    feasible = [r for r in everything if r.feasible and r.measurements]
    points = [normalized(r.measurements, ref, objectives) for r in feasible]
    frozen = {t.number: t for t in result.study.trials}

    def kind(number: int) -> str | None:
        return frozen[number].user_attrs.get(BASELINE)

    sampled = [r for r in everything if kind(r.number) is None]
    within_metric = [
        r for r in sampled if r.measurements and ref.metric - r.measurements.metric <= drop
    ]
    uniform = [r.measurements.size_bytes for r in feasible if kind(r.number) in UNIFORM]
    knapsack = [r.measurements.size_bytes for r in feasible if kind(r.number) == KNAPSACK]
    return {
        "model": config.name,
        "trials": trials,
        "mode": mode,
        "original_bytes": ref.size_bytes,
        "hypervolume": hypervolume(points, reference_point(objectives, drop)),
        "smallest": min((r.measurements.size_bytes for r in feasible), default=None),
        "fastest": min((r.measurements.relative_latency or 9 for r in feasible), default=None),
        "uniform": min(uniform, default=None),
        "knapsack": min(knapsack, default=None),
        "sampled_ok": f"{len(within_metric)}/{len(sampled)}",
        "latency_model": _latency_model_error(result, feasible + pruned_timed(everything)),
        "sensitivity_s": result.sensitivity.seconds if result.sensitivity else None,
        "wall_s": seconds,
    }


def pruned_timed(records: list) -> list:
    """Trials that were timed but missed a budget other than the metric's (size)."""
    return [r for r in records if not r.feasible and r.measurements and r.measurements.speedup]


def _latency_model_error(result, records: list) -> tuple[float, float] | None:
    """(median relative error, rank agreement) of the latency model over ``records``."""
    table = result.sensitivity
    if table is None or not table.model_ms:
        return None
    pairs = [
        (table.predicted_latency(result.space, r.plan), r.measurements.relative_latency)
        for r in records
        if r.plan is not None and r.measurements and r.measurements.relative_latency
    ]
    if len(pairs) < 2:
        return None
    errors = sorted(abs(p - m) / m for p, m in pairs)
    agree = total = 0
    for i, (p1, m1) in enumerate(pairs):
        for p2, m2 in pairs[i + 1 :]:
            if abs(m1 - m2) > 0.05 * max(m1, m2):  # pairs measured clearly apart
                total += 1
                agree += (p1 - p2) * (m1 - m2) > 0
    return errors[len(errors) // 2], agree / total if total else float("nan")


def ratios(rows: list[dict]) -> str:
    """Each mode's hypervolume over each random mode's (``random``, ``random-bare``) under
    the same seed, and the median."""
    import statistics

    lines = [
        "| model | trials | mode | over | hypervolume / theirs, per seed | median |",
        "|---|---:|---|---|---|---:|",
    ]
    for baseline in ("random", "random-bare"):
        theirs = {
            (r["model"], r["trials"], r["seed"]): r["hypervolume"]
            for r in rows
            if r["mode"] == baseline
        }
        keys = dict.fromkeys(
            (r["model"], r["trials"], r["mode"]) for r in rows if r["mode"] != baseline
        )
        for model, trials, mode in keys:
            got = [
                r["hypervolume"] / theirs[model, trials, r["seed"]]
                for r in rows
                if (r["model"], r["trials"], r["mode"]) == (model, trials, mode)
                and theirs.get((model, trials, r["seed"]))
            ]
            if got:
                each = ", ".join(f"{g:.2f}" for g in got)
                median = statistics.median(got)
                lines.append(
                    f"| {model} | {trials} | {mode} | {baseline} | {each} | {median:.2f} |"
                )
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (
        "| model | trials | seed | mode | hypervolume | smallest within budget "
        "| fastest (x original) | best uniform | knapsack plans alone "
        "| sampled within metric budget | latency model: error, order | sensitivity s | wall s |"
    )
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [
            r["model"],
            str(r["trials"]),
            str(r.get("seed", 0)),
            r["mode"],
            f"{r['hypervolume']:.5f}",
            _size(r["smallest"], r["original_bytes"]),
            "-" if r["fastest"] is None else f"{r['fastest']:.2f}",
            _size(r.get("best_uniform"), r["original_bytes"]),
            _size(r["knapsack"], r["original_bytes"]),
            r["sampled_ok"],
            "-" if r["latency_model"] is None else "{:.0%}, {:.0%}".format(*r["latency_model"]),
            "-" if r["sensitivity_s"] is None else f"{r['sensitivity_s']:.0f}",
            f"{r['wall_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _size(nbytes: int | None, original: int) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e3:,.1f} kB ({original / nbytes:.1f}x)"


if __name__ == "__main__":
    main()
