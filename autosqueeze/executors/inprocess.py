"""Evaluate in the driver's own process, one plan at a time: for debugging and tiny runs."""

from __future__ import annotations

import os
import socket

from autosqueeze.config import StudyConfig
from autosqueeze.executors import Executor, Outcome, evaluate_safely
from autosqueeze.measure import Evaluator
from autosqueeze.plan import Plan
from autosqueeze.task import Task


class InProcessExecutor(Executor):
    slots = 1

    def __init__(self, task: Task) -> None:
        self.evaluator = Evaluator(task)
        self._pending: list[tuple[int, Plan]] = []
        self._worker = f"{socket.gethostname()} pid {os.getpid()} (in-process)"

    @classmethod
    def create(cls, config: StudyConfig, task: Task) -> InProcessExecutor:
        return cls(task)

    def submit(self, key: int, plan: Plan) -> None:
        self._pending.append((key, plan))

    @property
    def in_flight(self) -> list[int]:
        return [key for key, _ in self._pending]

    def wait(self) -> list[Outcome]:
        key, plan = self._pending[0]
        outcome = evaluate_safely(self.evaluator, key, plan, self._worker)
        self._pending.pop(0)
        return [outcome]

    def close(self) -> None:
        self.evaluator.close()
