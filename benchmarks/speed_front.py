"""Does the front hold a faster model? Runs (or resumes) a study, takes its fastest front model
within the metric budget, and times it side by side with the fp32 model in this one process.

    python benchmarks/speed_front.py studies/digits-cnn.yaml studies/residual-cnn.yaml \
        [--study-dir-root runs/speed] [--rounds 9] [--workers 0]

For each study: the search runs with its config (resuming what the study dir holds), then the
fastest feasible front model and the uncompressed model are both loaded from their artifacts
and timed in interleaved rounds (fp32, compressed, fp32, ...), each round the median of
``measure.repeats`` forward passes at ``budgets.batch_size`` after warm-up, so machine drift
hits both alike. Prints one row per study: metrics, the speedup the search saw, and the
side-by-side speedup (median over rounds, with the range of the per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

from autosqueeze.artifacts.artifact import load_artifact
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.measure import measure_latency_beside
from autosqueeze.searching.search import run_search
from autosqueeze.settings.config import load_config

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--study-dir-root", type=Path, default=Path("runs/speed"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--workers", type=int, default=None, help="override compute.workers")
    args = parser.parse_args()
    rows = []
    for path in args.configs:
        config = load_config(path).with_overrides(
            study_dir=args.study_dir_root / load_config(path).name,
            workers=args.workers,
        )
        result = run_search(config, progress=True)
        ref = result.front.reference
        budget = config.budgets.max_metric_drop or 0.0
        within = [m for m in result.front.members if ref.metric - m.measurements.metric <= budget]
        fastest = min(within, key=lambda m: m.measurements.latency_ms)
        task = result.task
        evaluator = Evaluator(task)
        with tempfile.TemporaryDirectory() as tmp:
            original_path = Path(tmp) / "fp32.safetensors"
            fast_path = Path(tmp) / "fast.safetensors"
            evaluator.build(result.space.uniform_plan(), original_path)
            evaluator.build(fastest.plan, fast_path)
            original = load_artifact(original_path, task.skeleton(""), task.target)
            fast = load_artifact(fast_path, task.skeleton(fastest.plan.base), task.target)
            fast_metric = task.evaluate_metric(fast)
            ratios, fp32_ms, fast_ms = [], [], []
            measure = config.measure
            for _ in range(args.rounds):  # one round: fp32, then the compressed model
                timing = measure_latency_beside(
                    fast,
                    original,
                    task.example_input,
                    task.device,
                    warmup=measure.warmup,
                    repeats=measure.repeats,
                    rounds=1,
                )
                fp32_ms.append(timing.reference_ms)
                fast_ms.append(timing.latency_ms)
                ratios.append(timing.speedup)
        evaluator.close()
        got = fastest.measurements
        rows.append(
            {
                "study": config.name,
                "trial": str(fastest.number)
                + (f" ({fastest.baseline})" if fastest.baseline else "")
                + (f", student {fastest.plan.base}" if fastest.plan.base else ""),
                "metric fp32": f"{ref.metric:.4f}",
                "metric (reloaded)": f"{got.metric:.4f} ({fast_metric:.4f})",
                "size": f"{ref.size_bytes / got.size_bytes:.1f}x smaller",
                "search saw": f"{ref.latency_ms / got.latency_ms:.2f}x",
                "fp32 ms": f"{statistics.median(fp32_ms):.4f}",
                "compressed ms": f"{statistics.median(fast_ms):.4f}",
                "side by side": f"{statistics.median(ratios):.2f}x "
                f"({min(ratios):.2f}-{max(ratios):.2f})",
            }
        )
        print(f"plan of trial {fastest.number}: {fastest.plan.to_json()}")
    columns = list(rows[0])
    print(f"\nfastest front model within budget vs fp32, {args.rounds} interleaved rounds\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(row[c] for c in columns) + " |")


if __name__ == "__main__":
    main()
