"""Train a compressed model longer than the search did: ``autosqueeze finetune``'s procedure,
for a Python user too. The plan is compressed from the original, distilled from it for
``steps`` more steps on the calibration inputs, each weight on the grid it is stored on,
written to a file, and measured from that file beside the plan as the search built it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from autosqueeze.artifacts.artifact import artifact_bytes, save_artifact
from autosqueeze.common.errors import UserError
from autosqueeze.compression.techniques import compress
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.measure import Measurements
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import Task


@dataclass(frozen=True)
class Finetuned:
    steps: int  # the steps taken (recovery stops early once it no longer gains)
    lr: float
    before: Measurements  # the plan as the search built it
    after: Measurements  # the file written


def finetune(
    task: Task, plan: Plan, output: Path, steps: int, lr: float | None = None
) -> Finetuned:
    """Compress ``task``'s model by ``plan``, distill it ``steps`` steps (at ``lr``, or the
    study's ``recovery.lr``), write the artifact to ``output`` and measure both forms."""
    if task.recovery is None:
        raise UserError(
            "task.calibration: finetune distills the model from the original on calibration "
            "inputs, and the config names none; add task.calibration: 'module:callable' "
            "returning input batches kept apart from task.data."
        )
    longer = replace(task.recovery, steps=steps, lr=lr or task.recovery.lr, min_gain=0.0)
    evaluator = Evaluator(task)
    try:
        before = evaluator.measure_artifact(evaluator.artifact(plan))
        base = task.base_model(plan.base)
        compressed = compress(base, plan, task.target, task.recovery)
        taken = longer.run(compressed.module, base, compressed.codecs)
        try:
            save_artifact(artifact_bytes(compressed), output)
        except OSError as exc:
            raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
        after = evaluator.measure_artifact(output)
    finally:
        evaluator.close()
    return Finetuned(taken, longer.lr, before, after)
