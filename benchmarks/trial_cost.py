"""What one trial costs, phase by phase, and how that grows with the model.

    python benchmarks/trial_cost.py [CONFIG ...] [--plans 6]

Default configs: the digits CNN, the residual CNN, MiniLM and a BERT-base-sized encoder
(``benchmarks/studies/bert-base.yaml``). Each runs in a fresh process (so its peak RAM is its
own) as one evaluator would: it measures the uncompressed model, then ``--plans`` plans (the
int8 baseline, and random plans drawn from the space under a fixed seed), each through every
phase: compress (with recovery), load (the artifact's bytes back into a fresh model),
metric, memory, latency (timed beside the original). A trial whose metric or size misses
its budget stops after the metric; the ``stops`` column counts how many of the plans would
have. Prints a markdown table of median seconds per phase and the share of a full trial
spent outside the metric and the latency timing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [
    REPO / "studies" / "digits-cnn.yaml",
    REPO / "studies" / "residual-cnn.yaml",
    REPO / "studies" / "minilm.yaml",
    REPO / "benchmarks" / "studies" / "bert-base.yaml",
]
PHASES = ["compress", "load", "metric", "memory", "latency"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--plans", type=int, default=8)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.configs[0], args.plans)))
        return
    rows = []
    for config in args.configs:
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(config), "--plans", str(args.plans)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{config}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(table(rows))


def measure(path: Path, count: int) -> dict:
    import optuna

    from autosqueeze.measuring.evaluator import Evaluator
    from autosqueeze.measuring.measure import Limits
    from autosqueeze.problem.task import load_task
    from autosqueeze.searchspace.space import build_space
    from autosqueeze.settings.config import load_config

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_config(path)
    start = time.perf_counter()
    task = load_task(config)
    space = build_space(task.model, config.space, task.target)
    setup = time.perf_counter() - start
    evaluator = Evaluator(task)
    original = evaluator.evaluate(space.uniform_plan())
    limits = Limits.of(config.budgets, original.metric)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    plans = [space.uniform_plan(bits=8)]
    plans += [space.plan(sampler.ask(space.distributions).params) for _ in range(count - 1)]
    trials = []
    for plan in plans:
        got = evaluator.evaluate(plan)  # every phase, whatever the budgets say
        trials.append({**got.seconds, "stops": limits.missed(got.metric, got.size_bytes)})
    full = [sum(t[p] for p in PHASES) for t in trials]
    outside = [sum(t[p] for p in ("compress", "load", "memory")) for t in trials]
    return {
        "model": config.name,
        "params": sum(p.numel() for p in task.model.parameters()),
        "setup_s": setup,
        **{p: statistics.median(t[p] for t in trials) for p in PHASES},
        "trial_s": statistics.median(full),
        "stopped_s": statistics.median(t["compress"] + t["load"] + t["metric"] for t in trials),
        "outside_share": sum(outside) / sum(full),
        "stops": sum(1 for t in trials if t["stops"]),
        "plans": len(trials),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| model | params | compress s | load s | metric s | memory s | latency s | full trial s"
        " | stopped trial s | outside metric+latency | would stop | peak RAM GB |"
    )
    lines = [head, "|---" + "|---:" * 12 + "|"]
    for r in rows:
        cells = [
            r["model"],
            f"{r['params'] / 1e6:.1f}M",
            *(f"{r[p]:.2f}" for p in PHASES),
            f"{r['trial_s']:.2f}",
            f"{r['stopped_s']:.2f}",
            f"{r['outside_share']:.0%}",
            f"{r['stops']}/{r['plans']}",
            f"{r['peak_rss_gb']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
