"""Executors evaluate plans and hand back outcomes; the driver alone talks to the study.

An executor keeps at most ``slots`` evaluations in flight; ``submit`` starts one and
``wait`` blocks until at least one has finished. Executors are looked up by name and
imported only when used (Ray is a heavy import): ``create_executor(config, task)``.
"""

from __future__ import annotations

import importlib
import os
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from autosqueeze.common.errors import TrialError, UserError
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.measure import Limits, Measurements, ProbeResult
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import Task
from autosqueeze.settings.config import StudyConfig


@dataclass(frozen=True)
class Outcome:
    """What became of one submitted evaluation: measurements, or why it failed."""

    key: int
    measurements: Measurements | None = None
    error: str | None = None
    worker: str = ""  # where it ran, e.g. "10.0.0.2 pid 4242"


K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Executor(ABC):
    slots: int
    # evaluations run in other processes: a wait can stop at any moment and lose nothing, so
    # the driver takes a signal only between waits (an in-process wait is the evaluation)
    evaluates_elsewhere: bool = False

    @abstractmethod
    def submit(self, key: int, plan: Plan, limits: Limits | None = None) -> None:
        """Start evaluating ``plan``; one that misses ``limits`` stops before it is timed."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Block until at least one submitted evaluation has finished, or ``timeout`` seconds
        pass where the executor can stop waiting; return those that have (maybe none)."""

    @property
    @abstractmethod
    def in_flight(self) -> list[int]: ...

    @abstractmethod
    def artifacts(self, plans: dict[int, Plan]) -> Iterator[tuple[int, bytes]]:
        """Build each plan's artifact (the front's, after a search) on the evaluators;
        yields (key, bytes) as they are done."""

    @abstractmethod
    def probes(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        """Each plan's sensitivity probe (``Evaluator.probe``), spread over the evaluators;
        yields (key, result) as they are done, in any order."""

    @abstractmethod
    def layer_probes(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        """Each plan's probe by layer (``Evaluator.layer_probe``), as ``probes``."""

    @abstractmethod
    def timings(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        """Each plan's latency-model probe (``Evaluator.time_probe``), as ``probes``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


PROBES = ("probe", "layer_probe", "time_probe")
"""The evaluator's probes (its methods, and the Ray actor's): the whole model's, the changed
layers' alone, the latency model's."""


def probe_safely(evaluator: Evaluator, plan: Plan, kind: str = "probe") -> ProbeResult:
    """One of the evaluator's ``PROBES``; a failure is its result (the reason)."""
    got = _safely(lambda: getattr(evaluator, kind)(plan))
    return ProbeResult(error=got.error) if isinstance(got, _Failure) else got


def _safely(run: Callable[[], T]) -> T | _Failure:
    try:
        return run()
    except (TrialError, UserError) as exc:
        return _Failure(str(exc))
    except Exception as exc:  # noqa: BLE001 - a trial's failure, whatever raised it
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return _Failure(f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})")


@dataclass(frozen=True)
class _Failure:
    error: str


def evaluate_safely(
    evaluator: Evaluator, key: int, plan: Plan, limits: Limits | None, worker: str = ""
) -> Outcome:
    """Run one evaluation; any failure becomes an Outcome with a one-line reason."""
    got = _safely(lambda: evaluator.evaluate(plan, limits))
    if isinstance(got, _Failure):  # expected failures' messages say it all; others say where
        return Outcome(key, error=got.error, worker=worker)
    return Outcome(key, measurements=got, worker=worker)


def evaluate_now(executor: Executor, plan: Plan) -> Outcome:
    """Evaluate one plan outside the study (e.g. the reference) and wait for it."""
    key = -1 - len(executor.in_flight)
    executor.submit(key, plan)
    while True:
        for outcome in executor.wait():
            if outcome.key == key:
                return outcome


EXECUTORS: dict[str, str] = {
    "inprocess": "autosqueeze.searching.executors.inprocess:InProcessExecutor",
    "ray": "autosqueeze.searching.executors.ray:RayExecutor",
}


def executor_name(config: StudyConfig) -> str:
    """``compute.executor``, or by default the in-process one for ``compute.workers: 0`` and
    Ray for anything else."""
    name = config.compute.executor
    if name is None:
        return "inprocess" if config.compute.workers == 0 else "ray"
    if name not in EXECUTORS:
        raise UserError(
            f"compute.executor: unknown executor {name[:64]!r}; the executors are "
            f"{', '.join(EXECUTORS)}."
        )
    if name == "ray" and config.compute.workers == 0:
        raise UserError(
            "compute.workers: 0 means in-process, but compute.executor is ray: give "
            "compute.workers a count or 'auto', or drop compute.executor."
        )
    return name


def evaluator_capacity(config: StudyConfig, executor: str) -> str:
    """What ``executor`` can start here, to say beside ``compute.workers`` ("" where the count
    says it all); a count past it is refused now, as Ray would refuse it when the search
    starts. A local Ray starts one evaluator per CPU (per GPU share on CUDA); a cluster's size
    is known only once joined."""
    workers = config.compute.workers
    if executor == "inprocess":
        return "" if workers in (0, 1) else "the in-process executor evaluates one at a time"
    if executor != "ray" or config.compute.ray_address or os.environ.get("RAY_ADDRESS"):
        return "as many as the cluster has room for, once joined"
    if config.budgets.device.startswith("cuda"):
        import torch

        per = config.compute.gpus_per_worker
        can, unit = int(torch.cuda.device_count() / per), f"GPU share of {per:g}"
    else:
        can, unit = os.cpu_count() or 1, "CPU"
    if isinstance(workers, int) and workers > can:
        raise UserError(
            f"compute.workers: {workers:,} evaluators cannot start here: a local Ray starts "
            f"one per {unit}, {can} in all; ask for at most {can}, or 'auto', or join a "
            "larger cluster (compute.ray_address)."
        )
    return f"a local Ray: at most {can}, one per {unit}"


def create_executor(config: StudyConfig, task: Task) -> Executor:
    """The executor ``executor_name`` picks, from the ``EXECUTORS`` registry."""
    module, _, cls = EXECUTORS[executor_name(config)].partition(":")
    return getattr(importlib.import_module(module), cls).create(config, task)


__all__ = [
    "EXECUTORS",
    "Executor",
    "Outcome",
    "create_executor",
    "evaluate_now",
    "evaluator_capacity",
    "executor_name",
]
