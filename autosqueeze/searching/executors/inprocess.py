"""Evaluate in the driver's own process, one plan at a time: for debugging and tiny runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.measure import Limits, ProbeResult
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import Task
from autosqueeze.searching.executors import Executor, K, Outcome, evaluate_safely, probe_safely
from autosqueeze.settings.config import StudyConfig


class InProcessExecutor(Executor):
    slots = 1

    def __init__(self, task: Task) -> None:
        self.evaluator = Evaluator(task)
        self._pending: list[tuple[int, Plan, Limits | None]] = []
        self._worker = f"{socket.gethostname()} pid {os.getpid()} (in-process)"

    @classmethod
    def create(cls, config: StudyConfig, task: Task) -> InProcessExecutor:
        return cls(task)

    def submit(self, key: int, plan: Plan, limits: Limits | None = None) -> None:
        self._pending.append((key, plan, limits))

    @property
    def in_flight(self) -> list[int]:
        return [key for key, _, _ in self._pending]

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Runs the next evaluation here and now: ``timeout`` cannot cut it short (Ctrl-C can)."""
        key, plan, limits = self._pending[0]
        outcome = evaluate_safely(self.evaluator, key, plan, limits, self._worker)
        self._pending.pop(0)
        return [outcome]

    def artifacts(self, plans: dict[int, Plan]) -> Iterator[tuple[int, bytes]]:
        for key, plan in plans.items():
            yield key, self.evaluator.artifact(plan)

    def probes(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        for key, plan in plans.items():
            yield key, probe_safely(self.evaluator, plan)

    def layer_probes(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        for key, plan in plans.items():
            yield key, probe_safely(self.evaluator, plan, "layer_probe")

    def timings(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        for key, plan in plans.items():
            yield key, probe_safely(self.evaluator, plan, "time_probe")

    def close(self) -> None:
        self.evaluator.close()
