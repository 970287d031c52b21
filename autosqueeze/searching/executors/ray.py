"""A pool of long-lived Ray actors, each holding the base model once.

The task (model, data, metric) goes into Ray's object store once; each actor loads it at
start and then only receives plans. One actor per GPU when the budget's device is CUDA
(``compute.gpus_per_worker`` of one), otherwise one actor per CPU. An actor that dies
(segfault, OOM kill, ``os._exit``) or overruns ``search.trial_timeout_s`` fails just its
trial and is replaced. Latency is isolated per device by ``DeviceLock`` inside the actors.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from autosqueeze.common.errors import UserError
from autosqueeze.measuring.device_lock import DeviceLock
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.measure import Limits, ProbeResult
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import Task
from autosqueeze.searching.executors import (
    PROBES,
    Executor,
    K,
    Outcome,
    evaluate_safely,
    probe_safely,
)
from autosqueeze.settings.config import StudyConfig
from autosqueeze.usercode.user_code import import_user_modules


def import_ray() -> Any:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray
    # Ray runs its workers at niceness 15: beside any ordinary process (another job, the
    # driver, Ray's own daemons) an evaluator then got 2-5% of a core, and its timings
    # measured the wait. Evaluators are the work here, so they run at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        import ray
    except ImportError:
        raise UserError(
            "compute.workers: Ray is not installed (pip install ray); "
            "or set compute.workers: 0 (--workers 0) to evaluate in-process."
        ) from None
    return ray


class EvaluatorActor:
    """Runs in a Ray worker process; made a Ray actor class by ``ray.remote`` at pool start."""

    def __init__(self, folder: str, task_ref: list[Any], device: str) -> None:
        import ray

        if folder not in sys.path:
            sys.path.insert(0, folder)  # the user's modules, as in the driver
        if device.startswith("cuda"):
            device = "cuda"  # the GPU Ray assigned is this process's cuda:0
        with DeviceLock(torch.device(device)).shared():  # loading is work: not beside a timing
            task: Task = ray.get(task_ref[0])
            try:
                import_user_modules(task.config)
            except UserError as exc:  # another node without the user's files: as before
                warnings.warn(f"evaluator: {exc}", stacklevel=1)
            task.device = torch.device(device)
            self.evaluator = Evaluator(task)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.worker = f"{ray.util.get_node_ip_address()} node {self.node_id[:8]} pid {os.getpid()}"
        if task.device.type == "cuda":  # which of the node's GPUs Ray gave this evaluator
            gpus = ",".join(str(g) for g in ray.get_gpu_ids())
            self.worker += f" gpu {gpus} ({torch.cuda.get_device_name(task.device)})"

    def ready(self) -> tuple[str, str]:
        return self.worker, self.node_id

    def artifact(self, plan_json: str) -> bytes:
        return self.evaluator.artifact(Plan.from_json(plan_json))

    def probe(self, plan_json: str) -> ProbeResult:
        return probe_safely(self.evaluator, Plan.from_json(plan_json))

    def layer_probe(self, plan_json: str) -> ProbeResult:
        return probe_safely(self.evaluator, Plan.from_json(plan_json), "layer_probe")

    def time_probe(self, plan_json: str) -> ProbeResult:
        return probe_safely(self.evaluator, Plan.from_json(plan_json), "time_probe")

    def evaluate(self, key: int, plan_json: str, limits: Limits | None) -> Outcome:
        plan = Plan.from_json(plan_json)
        return evaluate_safely(self.evaluator, key, plan, limits, self.worker)


class RayExecutor(Executor):
    evaluates_elsewhere = True

    def __init__(
        self,
        task: Task,
        *,
        workers: int | str,
        address: str | None,
        trial_timeout_s: float | None,
        gpus_per_worker: float,
    ) -> None:
        ray = self._ray = import_ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            _init(ray, address)
        resources = ray.cluster_resources()
        if task.device.type == "cuda":
            if not resources.get("GPU"):
                raise UserError("budgets.device: CUDA was asked for, but Ray sees no GPU.")
            self._options = {"num_cpus": 1, "num_gpus": gpus_per_worker}
            capacity = int(resources["GPU"] / gpus_per_worker)
        else:
            self._options = {"num_cpus": 1}
            capacity = int(resources.get("CPU", 1))
        self.slots = capacity if workers == "auto" else int(workers)
        if self.slots > capacity:
            raise UserError(
                f"compute.workers: {self.slots} workers need {self.slots} "
                f"{'GPU slots' if task.device.type == 'cuda' else 'CPUs'}; Ray has {capacity}."
            )
        self._timeout = trial_timeout_s
        self._actor_class = ray.remote(**self._options)(EvaluatorActor)
        self._task_ref = ray.put(task)
        self._folder = str(task.config.folder)
        self._device = str(task.device)
        self._idle = [self._spawn() for _ in range(self.slots)]
        self._running: dict[Any, tuple[int, Any, float]] = {}
        try:
            self.placement = ray.get([actor.ready.remote() for actor in self._idle])
        except ray.exceptions.RayError as exc:
            self.close()
            raise UserError(
                f"compute: the Ray evaluators could not start: {_reason(exc)}"
            ) from None

    @classmethod
    def create(cls, config: StudyConfig, task: Task) -> RayExecutor:
        return cls(
            task,
            workers=config.compute.workers,
            address=config.compute.ray_address,
            trial_timeout_s=config.search.trial_timeout_s,
            gpus_per_worker=config.compute.gpus_per_worker,
        )

    @property
    def in_flight(self) -> list[int]:
        return [key for key, _, _ in self._running.values()]

    def submit(self, key: int, plan: Plan, limits: Limits | None = None) -> None:
        actor = self._idle.pop()
        ref = actor.evaluate.remote(key, plan.to_json(), limits)
        self._running[ref] = (key, actor, time.monotonic())

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            limits = [] if until is None else [until]
            if self._timeout is not None:
                limits.append(min(start for _, _, start in self._running.values()) + self._timeout)
            left = max(0.0, min(limits) - time.monotonic()) if limits else None
            ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=left)
            outcomes = [self._collect(ref) for ref in ready] + self._expire()
            if outcomes or (until is not None and time.monotonic() >= until):
                return outcomes

    def artifacts(self, plans: dict[int, Plan]) -> Iterator[tuple[int, bytes]]:
        return self._spread("artifact", plans)

    def probes(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        return self._probes("probe", plans)

    def layer_probes(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        return self._probes("layer_probe", plans)

    def timings(self, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        return self._probes("time_probe", plans)

    def _probes(self, method: str, plans: dict[K, Plan]) -> Iterator[tuple[K, ProbeResult]]:
        for key, got in self._spread(method, plans):
            yield key, (got if isinstance(got, ProbeResult) else ProbeResult(error=got))

    def _spread(self, method: str, plans: dict[K, Plan]) -> Iterator[tuple[K, Any]]:
        """Call an actor method on each plan, spread over the idle evaluators, one plan each
        at a time. An evaluator that dies or overruns ``search.trial_timeout_s`` is replaced;
        for probes the plan's result is then the reason, for artifacts it is an error."""
        waiting = list(plans.items())
        running: dict[Any, tuple[K, Any, float]] = {}
        while waiting or running:
            while waiting and self._idle:
                key, plan = waiting.pop(0)
                actor = self._idle.pop()
                ref = getattr(actor, method).remote(plan.to_json())
                running[ref] = (key, actor, time.monotonic())
            timeout = None
            if self._timeout is not None:
                oldest = min(start for _, _, start in running.values())
                timeout = max(0.0, oldest + self._timeout - time.monotonic())
            ready, _ = self._ray.wait(list(running), num_returns=1, timeout=timeout)
            if not ready:
                ref, (key, actor, _) = min(running.items(), key=lambda item: item[1][2])
                del running[ref]
                self._replace(actor)
                reason = f"timed out after {self._timeout:g} s (search.trial_timeout_s)"
                if method not in PROBES:  # a probe's failure is its result, an artifact's an error
                    raise UserError(f"building an artifact {reason}")
                yield key, reason
                continue
            key, actor, _ = running.pop(ready[0])
            try:
                value = self._ray.get(ready[0])
            except self._ray.exceptions.RayActorError as exc:
                self._replace(actor)
                if method not in PROBES:  # a probe's failure is its result, an artifact's an error
                    raise
                yield key, f"the evaluator process died: {_reason(exc)}; replaced it"
                continue
            self._idle.append(actor)
            yield key, value

    def close(self) -> None:
        for actor in [*self._idle, *(a for _, a, _ in getattr(self, "_running", {}).values())]:
            self._ray.kill(actor, no_restart=True)
        self._idle, self._running = [], {}
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def _spawn(self) -> Any:
        return self._actor_class.remote(self._folder, [self._task_ref], self._device)

    def _collect(self, ref: Any) -> Outcome:
        key, actor, _ = self._running.pop(ref)
        try:
            outcome = self._ray.get(ref)
        except self._ray.exceptions.RayActorError as exc:
            self._replace(actor)
            return Outcome(key, error=f"the evaluator process died: {_reason(exc)}; replaced it")
        except self._ray.exceptions.RayError as exc:
            self._idle.append(actor)
            return Outcome(key, error=f"Ray failed to run the evaluation: {_reason(exc)}")
        self._idle.append(actor)
        return outcome

    def _expire(self) -> list[Outcome]:
        if self._timeout is None:
            return []
        now = time.monotonic()
        expired = []
        for ref, (key, actor, start) in list(self._running.items()):
            if now - start > self._timeout:
                del self._running[ref]
                self._replace(actor)
                expired.append(
                    Outcome(
                        key,
                        error=f"timed out after {self._timeout:g} s "
                        "(search.trial_timeout_s); its evaluator was replaced",
                    )
                )
        return expired

    def _replace(self, actor: Any) -> None:
        """A new evaluator for a dead or hung one, started before it is given work: a
        process starting up computes, and nothing should compute beside a timing unlocked."""
        self._ray.kill(actor, no_restart=True)
        fresh = self._spawn()
        try:
            self._ray.get(fresh.ready.remote())
        except self._ray.exceptions.RayError:
            pass  # its first evaluation reports why it cannot run
        self._idle.append(fresh)


def _init(ray: Any, address: str | None) -> None:
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        options["include_dashboard"] = False
    else:
        _probe(address)
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address, **options)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError depending on version
        raise UserError(
            f"compute.ray_address: cannot join the Ray cluster at {address!r}: {_reason(exc)}"
        ) from None
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        # Ray's core worker replaces the SIGTERM handler with one that prints C++ frames and
        # aborts; the CLI's stops the search as Ctrl-C does (trials failed and re-queued)
        signal.signal(signal.SIGTERM, on_term)


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nothing listens at (Ray itself retries for many minutes)."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if match is None:
        return  # e.g. "auto": let Ray resolve it
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"compute.ray_address: cannot join the Ray cluster at {address!r}: nothing answers "
            f"there ({exc.strerror or exc}). Start one with 'ray start --head' (docs/cluster.md)."
        ) from None


def _reason(exc: BaseException) -> str:
    """One line from a Ray error: its first line, plus the dead worker's pid and exit detail."""
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    pid = re.search(r"\bpid: (\d+)", text)
    detail = re.search(r"Worker exit detail: ([^.]*\.)", text)
    extra = [f"pid {pid.group(1)}"] if pid else []
    extra += [detail.group(1)] if detail else []
    return f"{first} ({'; '.join(extra)})" if extra else first
