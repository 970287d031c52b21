"""Pruning criteria against each other: magnitude, activation (Wanda), Hessian (SparseGPT).

Every Linear of all-MiniLM-L6-v2 (fidelity on the MiniLM study's 256 validation sentences),
and every Linear and Conv2d of the digits CNN (accuracy on its test split), pruned to the same
share of weights by each criterion, with no recovery training. The input statistics (norms,
X^T X) come from calibration data that the metric does not see: MiniLM's 512 calibration
sentences, the digits' calibration images (at most 8 batches).

    pip install -e ".[transformers]"
    python benchmarks/prune_criteria.py [--ratios 0.3 0.5 0.7] [--no-minilm]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch import nn

from autosqueeze.compression.techniques import Target, compress
from autosqueeze.compression.techniques.prune import CRITERIA
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import load_task
from autosqueeze.settings.config import load_config

STUDIES = Path(__file__).resolve().parent.parent / "studies"


def _inputs(batches: list) -> list:
    return [b[0] if isinstance(b, tuple) else b for b in batches]


def cases(minilm: bool) -> list[tuple[str, str, list]]:
    """(name, study file, calibration inputs) of the models compared."""
    from autosqueeze.examples import digits

    found = [("digits CNN", "digits-cnn.yaml", _inputs(digits.calibration()))]
    if minilm:
        from autosqueeze.examples import minilm as mini

        found.append(("all-MiniLM-L6-v2", "minilm.yaml", _inputs(mini.calibration())))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    rows = []
    for label, study, calibration in cases(not args.no_minilm):
        task = load_task(load_config(STUDIES / study))
        names = [n for n, m in task.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        target = Target(calibration=calibration)
        for ratio in args.ratios:
            cells = {}
            for criterion in CRITERIA:
                plan = Plan.uniform(names, prune=ratio, prune_by=criterion)
                model = compress(task.model, plan, target).module
                cells[criterion] = task.evaluate_metric(model)
            rows.append((label, task.config.metric_name, ratio, cells))
            print(f"  {label} at {ratio}: {cells}", flush=True)
    print(f"\n{len(rows)} settings in {time.monotonic() - started:.0f} s; no recovery training\n")
    print("| model | metric | weights zeroed | " + " | ".join(CRITERIA) + " |")
    print("|---|---|---|" + "---|" * len(CRITERIA))
    for label, metric, ratio, cells in rows:
        values = " | ".join(f"{cells[c]:.4f}" for c in CRITERIA)
        print(f"| {label} | {metric} | {ratio:.0%} of every layer | {values} |")


if __name__ == "__main__":
    main()
