"""Measurements of one compressed model, all taken on the artifact as it is loaded back.

size: the artifact file's bytes on disk. latency: the median wall time of the loaded model's
forward at the budget's batch size on the budget's device, after warm-up. metric: the task
metric of the loaded model. Measuring the loaded form is what makes a reported number
reproducible from the exported file.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    inputs = to_device(inputs, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        _timed(model, inputs, sync, warmup, repeats, times)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times) * 1000.0


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


class Evaluator:
    """Turns plans into measurements for one task; holds the base model once."""

    def __init__(self, task: Task, workdir: Path | None = None) -> None:
        self.task = task
        self.lock = DeviceLock(task.device)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="autosqueeze-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]

    def build(self, plan: Plan, path: Path) -> int:
        """Compress the base model by ``plan`` and write the artifact; returns its bytes."""
        try:
            compressed = compress(self.task.model, plan)
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
            model = load_artifact(path, copy.deepcopy(self.task.model)).to(self.task.device)
            metric = float(self.task.evaluate_metric(model))
        if not math.isfinite(metric):
            raise TrialError(f"the metric is {metric} for this model")
        measure = self.task.config.measure
        with self.lock.exclusive():
            latency = measure_latency(
                model,
                self.task.example_input,
                self.task.device,
                warmup=measure.warmup,
                repeats=measure.repeats,
                threads=measure.threads,
            )
        return Measurements(metric=metric, size_bytes=size, latency_ms=latency)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
