"""The sensitivity pass by layer against the pass by whole model: time, and the plans each
table gives the knapsack.

For each study, the pass runs twice on a fresh study (``sensitivity.by: model``, then
``layer``); printed per pass: whole-model forward passes (probes and checks), seconds, the
Spearman correlation of its distortions with the whole-model pass's (over the probes both
judged), and the knapsack's size-first plans on the whole-model table's ladder of
distortion levels around the metric budget: each plan's predicted bytes, the layers where
the two passes' plans differ, and each plan's metric drop measured on the study's whole
validation data (the model as the plan's artifact loads it).

    python -P benchmarks/sensitivity_by_layer.py [residual-cnn] [minilm] [STUDY.yaml ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

from autosqueeze.compression.techniques import applied
from autosqueeze.searching.search import run_sensitivity
from autosqueeze.searching.sensitivity import candidate_plans, ladder
from autosqueeze.settings.config import load_config

STUDIES = Path(__file__).resolve().parent.parent / "studies"
LEVELS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="*", default=["residual-cnn", "minilm"])
    parser.add_argument("--runtime", default="torch")
    args = parser.parse_args()
    for name in args.studies:
        _compare(name, args.runtime)


def _compare(name: str, runtime: str) -> None:
    path = Path(name) if name.endswith(".yaml") else STUDIES / f"{name}.yaml"
    base = load_config(path).with_overrides(runtime=runtime, workers=0)
    results = {}
    for by in ("model", "layer"):
        with tempfile.TemporaryDirectory() as folder:
            config = base.with_overrides(study_dir=Path(folder))
            config = config.model_copy(
                update={"sensitivity": config.sensitivity.model_copy(update={"by": by})}
            )
            began = time.monotonic()
            result = run_sensitivity(config, progress=False)
            results[by] = (result, time.monotonic() - began)
    whole = results["model"][0]
    task, space, drop = whole.task, whole.space, base.budgets.max_metric_drop
    levels = ladder(whole.table, LEVELS, drop)
    reference = float(task.evaluate_metric(task.model))
    plans = {
        by: candidate_plans(space, got.table, task.model, levels)
        for by, (got, _) in results.items()
    }
    print(
        f"\n{path.stem} ({sum(p.numel() for p in task.model.parameters()):,} parameters, "
        f"{len(whole.table.drops)} probes, metric budget {drop})\n"
    )
    print(
        "| pass | whole-model forwards | seconds | Spearman vs by model | smallest plan within "
        "budget | plans at the ladder's levels: predicted bytes / measured drop |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for by, (got, seconds) in results.items():
        table = got.table
        forwards = len(table.drops) - len(table.predicted) + 1
        shared = [k for k in whole.table.distortions if k in table.distortions]
        rho = spearmanr(
            [whole.table.distortions[k] for k in shared], [table.distortions[k] for k in shared]
        ).statistic
        cells, within = [], []
        for candidate in plans[by]:
            with applied(task.model, candidate.plan, task.target) as model:
                lost = reference - float(task.evaluate_metric(model))
            cells.append(f"{candidate.nbytes:,} B / {lost:.4f}")
            within += [candidate.nbytes] if lost <= drop else []
        best = f"{min(within):,} B" if within else "none"
        row = [by, str(forwards), f"{seconds:.0f}", f"{rho:.3f}", best, "; ".join(cells)]
        print("| " + " | ".join(row) + " |", flush=True)
    for a, b in zip(plans["model"], plans["layer"]):
        differ = [n for n, lp in a.plan.layers.items() if b.plan.layers.get(n) != lp]
        differ += [n for n in b.plan.layers if n not in a.plan.layers]
        print(f"- level {a.level:.3g}: the plans differ on {len(set(differ))} layers")


if __name__ == "__main__":
    main()
