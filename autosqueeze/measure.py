"""Measurements of one compressed model, all taken on the artifact as it is loaded back.

size: the artifact file's bytes on disk. latency: the median wall time of the loaded model's
forward at the budget's batch size on the budget's device, after warm-up, timed in rounds
interleaved with the original model so that machine drift can be taken out (see
``Measurements.drift_corrected``). memory: the peak
bytes one such forward needs (see ``measure_memory``). metric: the task metric of the loaded
model. The loaded model is in its execution form (its kernels), and measuring that form is
what makes a reported number reproducible from the exported file.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosqueeze.artifact import load_artifact, save_artifact
from autosqueeze.device_lock import DeviceLock
from autosqueeze.errors import TrialError
from autosqueeze.metrics import call_model, to_device
from autosqueeze.plan import Plan
from autosqueeze.task import Task
from autosqueeze.techniques import compress


@dataclass(frozen=True)
class Measurements:
    metric: float
    size_bytes: int
    latency_ms: float
    memory_mb: float | None = None  # None for trials of studies made before it was measured
    reference_latency_ms: float | None = None  # the original model, timed beside this one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def drift_corrected(self, reference: Measurements) -> Measurements:
        """This latency as it would have measured when ``reference`` (the study's original
        model) was timed: scaled by how fast the original ran beside it in this trial.
        On a shared or throttling machine the same model's latency drifts by 1.5x within
        minutes; the side-by-side ratio does not, so trials measured minutes apart compare."""
        if self.reference_latency_ms is None or self.reference_latency_ms <= 0:
            return self
        scale = reference.latency_ms / self.reference_latency_ms
        return replace(self, latency_ms=self.latency_ms * scale)


def measure_latency(
    model: nn.Module,
    inputs: Any,
    device: torch.device,
    *,
    warmup: int = 20,
    repeats: int = 100,
    threads: int | None = None,
) -> float:
    """Median milliseconds of one forward pass, after ``warmup`` untimed ones.

    On the CPU it runs with ``threads`` intra-op threads (default: every CPU this process may
    use), whatever the calling process was given, so every worker times the same deploy form.
    """
    times: list[float] = []
    with _timing(device, threads) as sync:
        _timed(model, to_device(inputs, device), sync, warmup, repeats, times)
    return statistics.median(times) * 1000.0


def measure_latency_beside(
    model: nn.Module,
    reference: nn.Module,
    inputs: Any,
    device: torch.device,
    *,
    warmup: int = 20,
    repeats: int = 100,
    threads: int | None = None,
    rounds: int = 5,
) -> tuple[float, float]:
    """Median milliseconds of ``model`` and of ``reference``, timed in ``rounds`` interleaved
    rounds (reference, model, reference, ...) of ``repeats / rounds`` passes each."""
    per_round = max(1, repeats // rounds)
    model_times: list[float] = []
    reference_times: list[float] = []
    inputs = to_device(inputs, device)
    with _timing(device, threads) as sync:
        for i in range(rounds):
            first = warmup if i == 0 else 2
            _timed(reference, inputs, sync, first, per_round, reference_times)
            _timed(model, inputs, sync, first, per_round, model_times)
    return statistics.median(model_times) * 1000.0, statistics.median(reference_times) * 1000.0


@contextlib.contextmanager
def _timing(device: torch.device, threads: int | None) -> Iterator[Callable[[], None]]:
    """The conditions every timing runs under; yields the device's synchronize. On the CPU,
    ``threads`` intra-op threads (default: every CPU this process may use), restored after."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        yield torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    finally:
        torch.set_num_threads(previous)


def _timed(
    model: nn.Module, inputs: Any, sync: Any, warmup: int, repeats: int, times: list[float]
) -> None:
    with torch.inference_mode():
        for _ in range(warmup):
            call_model(model, inputs)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(model, inputs)
            sync()
            times.append(time.perf_counter() - start)


def measure_memory(model: nn.Module, inputs: Any, device: torch.device) -> float:
    """Peak megabytes (1e6 bytes) of one forward pass: the model's weights in their execution
    form, the inputs, and the most memory the pass holds at once.

    CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``). CPU: the bytes of every
    tensor the model holds (packed int8/int4 weights at their real width) plus the peak of the
    CPU allocations made during the pass, replayed from PyTorch's profiler memory events.
    """
    inputs = to_device(inputs, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            call_model(model, inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 1e6
    resident = _held_bytes(model.state_dict(keep_vars=True)) + _held_bytes(inputs)
    return (resident + _peak_allocated_cpu(model, inputs)) / 1e6


def _held_bytes(value: Any) -> int:
    """Bytes of the tensors in a state dict or input structure, each storage counted once."""
    seen: set[int] = set()

    def walk(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            key = v.data_ptr() if not v.is_quantized else id(v)
            if key in seen:
                return 0
            seen.add(key)
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0

    return walk(value)


def _peak_allocated_cpu(model: nn.Module, inputs: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call_model(model, inputs)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side logs start/stop lines straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Evaluator:
    """Turns plans into measurements for one task; holds the base model once."""

    def __init__(self, task: Task, workdir: Path | None = None) -> None:
        self.task = task
        self.lock = DeviceLock(task.device)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="autosqueeze-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self._reference_model: nn.Module | None = None

    def build(self, plan: Plan, path: Path) -> int:
        """Compress the base model by ``plan`` and write the artifact; returns its bytes."""
        try:
            compressed = compress(self.task.model, plan, self.task.target, self.task.recovery)
        except ValueError as exc:
            raise TrialError(str(exc)) from exc
        return save_artifact(compressed, path)

    def evaluate(self, plan: Plan) -> Measurements:
        path = self.workdir / "trial.safetensors"
        with self.lock.shared():
            self.build(plan, path)
        return self.measure_artifact(path)

    def measure_artifact(self, path: Path) -> Measurements:
        """Load an artifact and measure it: metric beside other work, latency alone."""
        size = path.stat().st_size
        with self.lock.shared():
            model = load_artifact(path, copy.deepcopy(self.task.model), self.task.target)
            metric = float(self.task.evaluate_metric(model))
        if not math.isfinite(metric):
            raise TrialError(f"the metric is {metric} for this model")
        measure = self.task.config.measure
        with self.lock.exclusive():
            latency, reference_latency = measure_latency_beside(
                model,
                self._reference(),
                self.task.example_input,
                self.task.device,
                warmup=measure.warmup,
                repeats=measure.repeats,
                threads=measure.threads,
            )
            memory = measure_memory(model, self.task.example_input, self.task.device)
        return Measurements(metric, size, latency, memory, reference_latency)

    def _reference(self) -> nn.Module:
        """The original model on the device, timed beside every trial."""
        if self._reference_model is None:
            model = self.task.model
            if self.task.device.type != "cpu":
                model = copy.deepcopy(model).to(self.task.device)
            self._reference_model = model.eval()
        return self._reference_model

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
