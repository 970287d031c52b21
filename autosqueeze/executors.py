"""Executors evaluate plans and hand back outcomes; the driver alone talks to the study.

An executor has ``slots`` evaluations in flight at most; ``submit`` starts one and
``wait`` blocks until at least one has finished. The in-process executor runs each plan
when waited on, in the driver's own process: for debugging and tiny runs.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass

from autosqueeze.errors import TrialError
from autosqueeze.measure import Evaluator, Measurements
from autosqueeze.plan import Plan
from autosqueeze.task import Task


@dataclass(frozen=True)
class Outcome:
    """What became of one submitted trial: measurements, or the reason it failed."""

    trial: int
    measurements: Measurements | None = None
    error: str | None = None


class Executor(ABC):
    slots: int

    @abstractmethod
    def submit(self, trial: int, plan: Plan) -> None: ...

    @abstractmethod
    def wait(self) -> list[Outcome]:
        """Block until at least one submitted trial has finished; return those that have."""

    @property
    @abstractmethod
    def in_flight(self) -> list[int]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def evaluate_safely(evaluator: Evaluator, trial: int, plan: Plan) -> Outcome:
    """Run one evaluation; any failure becomes an Outcome with a one-line reason."""
    try:
        return Outcome(trial, measurements=evaluator.evaluate(plan))
    except TrialError as exc:
        return Outcome(trial, error=str(exc))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return Outcome(
            trial, error=f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        )


class InProcessExecutor(Executor):
    slots = 1

    def __init__(self, task: Task) -> None:
        self.evaluator = Evaluator(task)
        self._pending: list[tuple[int, Plan]] = []

    def submit(self, trial: int, plan: Plan) -> None:
        self._pending.append((trial, plan))

    @property
    def in_flight(self) -> list[int]:
        return [trial for trial, _ in self._pending]

    def wait(self) -> list[Outcome]:
        trial, plan = self._pending[0]
        outcome = evaluate_safely(self.evaluator, trial, plan)
        self._pending.pop(0)
        return [outcome]

    def close(self) -> None:
        self.evaluator.close()


EXECUTORS = {"inprocess": InProcessExecutor}
