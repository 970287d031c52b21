"""``autosqueeze export``'s procedure: a plan's model written as the file a user ships (the
artifact, a ``torch.export`` program or an ONNX model), built by an evaluator as the search
built what it measured. It sits above the measuring stage, which the export's formats
(``export.py``) sit below: an evaluator runs ONNX files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autosqueeze.artifacts.artifact import load_artifact, stored_integers
from autosqueeze.artifacts.export import export_onnx, export_program
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import Task

FORMS = ("artifact", "pt2", "onnx")
TRACERS = {"pt2": "torch.export", "onnx": "torch.onnx"}


@dataclass(frozen=True)
class Exported:
    path: Path
    size_bytes: int  # the file written
    artifact_bytes: int  # the plan's artifact: the bytes the search measured
    notes: list[str]  # for the user: what the form changed, how to run it


class NotTraced(Exception):
    """``export_plan``: the tracer refused the model, or the form cannot hold the plan (a
    ``ValueError``); ``cause`` is what was raised."""

    def __init__(self, form: str, cause: Exception) -> None:
        super().__init__(f"{TRACERS[form]} cannot trace the model: {cause}")
        self.form, self.tracer, self.cause = form, TRACERS[form], cause


def export_plan(task: Task, plan: Plan, output: Path, form: str = "artifact") -> Exported:
    """Compress ``task``'s model by ``plan`` and write it to ``output`` as ``form``:
    ``autosqueeze export``'s procedure. ``artifact`` is the search's own file; ``pt2`` and
    ``onnx`` are traced from that artifact loaded back (for ONNX as torch's own layers, its
    integers kept aside), so what ships is what the search measured. A trace that fails
    raises ``NotTraced``; a file that cannot be written, ``OSError``."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {', '.join(FORMS)}")
    evaluator = Evaluator(task)
    try:
        if form == "artifact":
            size = evaluator.build(plan, output)
            return Exported(output, size, size, [])
        artifact = evaluator.artifact(plan)
    finally:
        evaluator.close()
    model = task.skeleton(plan.base)
    try:
        if form == "pt2":
            model = load_artifact(artifact, model, task.target)
            notes = export_program(model, plan, task.example_input, output)
        else:
            model = load_artifact(artifact, model, task.target, execution_form=False)
            integers = stored_integers(artifact)
            notes = export_onnx(
                model, plan, integers, task.example_input, output, task.calibration_inputs
            )
    except OSError:
        raise
    except Exception as exc:  # the tracer's own refusal of the model's code, or a ValueError
        raise NotTraced(form, exc) from exc
    return Exported(output, output.stat().st_size, len(artifact), notes)
