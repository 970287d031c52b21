"""Where a front model's bytes went: from the fp32 artifact through each step of its plan
(structure, pruning, quantization or weight sharing, entropy coding, deflate), each step's
bytes and the factor it gained.

    python benchmarks/size_shares.py CONFIG [--trial N]

The study must have been searched. Default trial: the smallest front model within the
metric budget. The structure and pruning rows are the plan's structural knobs, then its
pruning too, stored fp32 and built without recovery training (the weights differ from the
trial's; the shapes and the zeros' count do not). The last three rows are the trial's own
artifact, rebuilt from its plan as the search built it: every tensor bit-packed, then as
stored (entropy-coded where that is smaller), then as shipped (deflated where smaller).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--trial", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(args.config.parent))
    print(table(*shares(args.config, args.trial)))


def shares(path: Path, number: int | None) -> tuple[int, list[tuple[str, int]]]:
    from autosqueeze.artifacts.artifact import artifact_bytes, bit_packed_bytes, stored_bytes
    from autosqueeze.compression.techniques import TECHNIQUES, compress
    from autosqueeze.measuring.evaluator import Evaluator
    from autosqueeze.plans.plan import Plan
    from autosqueeze.problem.task import load_task
    from autosqueeze.results.front import compute_front
    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.records import records
    from autosqueeze.studies.study import open_study

    config = load_config(path)
    study = open_study(config, create=False)
    if number is None:
        front = compute_front(study, config.objectives)
        number = min(front.members, key=lambda r: r.measurements.size_bytes).number
    record = next(r for r in records(study) if r.number == number)
    task = load_task(config)

    def keeping(knobs: set[str]) -> Plan:
        return Plan(
            {
                name: lp.replace(**{k: t.identity for k, t in TECHNIQUES.items() if k not in knobs})
                for name, lp in record.plan.layers.items()
            }
        )

    def stored(plan: Plan) -> int:
        return len(stored_bytes(artifact_bytes(compress(task.model, plan, task.target))))

    structural = {k for k, t in TECHNIQUES.items() if t.structural}
    evaluator = Evaluator(task)
    try:
        shipped = evaluator.artifact(record.plan)
    finally:
        evaluator.close()
    steps = [
        ("fp32 (the original's artifact, not deflated)", stored(Plan())),
        ("+ structure (" + ", ".join(sorted(structural)) + ")", stored(keeping(structural))),
        ("+ pruning", stored(keeping(structural | {"prune", "prune_by"}))),
        (
            "+ quantization and weight sharing, bit-packed",
            len(stored_bytes(bit_packed_bytes(shipped))),
        ),
        ("+ entropy coding (Huffman, where smaller)", len(stored_bytes(shipped))),
        ("+ deflate (the file as shipped)", len(shipped)),
    ]
    return number, steps


def table(number: int, steps: list[tuple[str, int]]) -> str:
    lines = [
        f"trial {number}",
        "",
        "| step | bytes | this step | so far |",
        "|---|---:|---:|---:|",
    ]
    first = previous = steps[0][1]
    for name, nbytes in steps:
        lines.append(f"| {name} | {nbytes:,} | {previous / nbytes:.2f}x | {first / nbytes:.1f}x |")
        previous = nbytes
    return "\n".join(lines)


if __name__ == "__main__":
    main()
