"""How a compressed model is measured, always as its artifact is loaded back (the
evaluator, ``autosqueeze.measuring.evaluator``, builds and loads it).

size: the artifact's bytes, exactly as the file would hold them. metric: the task metric of
the loaded model. speed: the loaded model timed in rounds interleaved with the original model
(``measure_latency_beside``); the ratio of the two, ``speedup``, is the primary figure, since
whatever slows the machine slows both. memory: the peak bytes one forward needs
(``measure_memory``). The loaded model is in its execution form (its kernels), and measuring
that form is what makes a reported number reproducible from the exported file.

A trial stops early (``Measurements.stopped``) once its metric or size already misses a
budget: it cannot reach the front, so its latency and memory are not worth measuring.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from autosqueeze.common.nested import tensors
from autosqueeze.common.quiet import STDERR, silenced
from autosqueeze.settings.config import Budgets
from autosqueeze.settings.objectives import OBJECTIVES
from autosqueeze.usercode.metrics import call_model, to_device


@dataclass(frozen=True)
class Measurements:
    metric: float
    size_bytes: int
    latency_ms: float | None  # None when the trial stopped before it was timed
    memory_mb: float | None = None
    reference_latency_ms: float | None = None  # the original model, timed beside this one
    speedup: float | None = None  # original / this model, timed side by side
    stopped: str | None = None  # why the trial stopped before latency and memory
    timing_spread: float | None = None  # how much the side-by-side rounds disagreed
    timing_attempts: int | None = None  # timings taken (more than one: a disturbance)
    seconds: dict[str, float] = field(default_factory=dict, compare=False)  # per phase
    # objective name -> value, for the objectives measured by their own ``measure``
    extra: dict[str, float] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """An objective with its own ``measure`` reads like a field (None: not measured)."""
        if name.startswith("__"):
            raise AttributeError(name)
        if name in OBJECTIVES:
            return self.__dict__.get("extra", {}).get(name)
        raise AttributeError(f"{type(self).__name__} has no {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def relative_latency(self) -> float | None:
        """This model's latency as a fraction of the original's, timed side by side."""
        return 1.0 / self.speedup if self.speedup else None

    def at_reference(self, reference_ms: float) -> Measurements:
        """Absolute latency derived from the side-by-side speedup and the study's robust
        reference latency of the original (``robust_latency``): one disturbed timing of the
        original cannot skew it, and trials timed minutes apart compare."""
        if not self.speedup:
            return self
        return replace(self, latency_ms=reference_ms / self.speedup)


@dataclass(frozen=True)
class ProbeResult:
    """A sensitivity probe: the metric on the first samples and the outputs' distortion
    (None where they cannot be compared), or why it could not be measured. A timing probe
    (``Evaluator.time_probe``) instead gives ``layer_ms``, (original, probed) milliseconds
    of the layers whose execution form it changes, timed side by side on their own inputs,
    and ``model_ms``, the whole original model's as this evaluator times it. A probe of
    the pass by layer (``Evaluator.layer_probe``) gives ``layer_errors``: per layer it
    changes, its outputs' squared error relative to the original's, run alone."""

    metric: float | None = None
    distortion: float | None = None
    error: str | None = None
    layer_ms: tuple[float, float] | None = None
    model_ms: float | None = None
    layer_errors: dict[str, float] | None = None


# the budgets a trial stops on: its metric and size are measured before latency and memory
_METRIC, _SIZE = OBJECTIVES["metric"], OBJECTIVES["size_bytes"]


@dataclass(frozen=True)
class Limits:
    """What a trial must reach to possibly join the front; one that misses stops early."""

    min_metric: float | None = None
    max_size_bytes: int | None = None
    max_first_look_drop: float | None = None  # on the first samples: stop there past it

    @classmethod
    def of(
        cls, budgets: Budgets, original_metric: float, early_stop: float | None = None
    ) -> Limits:
        """The limits the metric and size budgets set, given the original model's metric;
        with ``early_stop``, a trial whose metric on the first samples fell more than that
        many times ``max_metric_drop`` stops before the full metric."""
        drop, size = _METRIC.budget_of(budgets), _SIZE.limit(budgets, None)
        return cls(
            min_metric=_METRIC.limit(budgets, original_metric),
            max_size_bytes=int(size) if size is not None else None,
            max_first_look_drop=drop * early_stop if drop is not None and early_stop else None,
        )

    def missed(self, metric: float, size: int) -> str | None:
        if self.min_metric is not None and metric < self.min_metric:
            return f"metric {metric:.6g} is below {self.min_metric:.6g} (budgets.{_METRIC.budget})"
        if self.max_size_bytes is not None and size > self.max_size_bytes:
            return f"{size:,} bytes exceed {self.max_size_bytes:,} (budgets.{_SIZE.budget})"
        return None


def robust_latency(samples: list[float]) -> float | None:
    """The original model's latency from many side-by-side timings: the median of those
    within 1.5x of the (low) median of all. A timing taken while the machine was busy (which
    can read 20x slow) neither becomes the reference nor moves it; of two, the faster wins,
    since a disturbance only ever slows a timing."""
    if not samples:
        return None
    middle = statistics.median_low(samples)
    kept = [s for s in samples if middle / OUTLIER_FACTOR <= s <= middle * OUTLIER_FACTOR]
    return statistics.median(kept)


OUTLIER_FACTOR = 1.5


@dataclass(frozen=True)
class Timing:
    latency_ms: float  # median of the model's passes
    reference_ms: float  # median of the original's passes, timed beside it
    speedup: float  # median over rounds of (original's round median / model's round median)
    spread: float  # (max - min) / median of the per-round ratios and original's round medians
    attempts: int


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
    attempts: int = 3,
    max_spread: float = 0.5,
    expected_reference_ms: float | None = None,
) -> Timing:
    """``model`` and ``reference`` timed in ``rounds`` interleaved rounds (reference, model,
    reference, ...) of ``repeats / rounds`` passes each.

    A timing is *disturbed* when its rounds disagree (``spread`` above ``max_spread``) or the
    original ran more than ``DISTURBED_FACTOR`` times slower than ``expected_reference_ms``
    (what it usually takes here): something else was computing. It is then taken again, up
    to ``attempts`` times, and the least disturbed timing is kept.
    """
    taken: list[Timing] = []
    while len(taken) < attempts:
        taken.append(
            _interleaved(model, reference, inputs, device, warmup, repeats, threads, rounds)
        )
        if not _disturbed(taken[-1], max_spread, expected_reference_ms):
            break
    best = min(taken, key=lambda t: _badness(t, expected_reference_ms))
    return replace(best, attempts=len(taken))


DISTURBED_FACTOR = 1.3


def _disturbed(timing: Timing, max_spread: float, expected_ms: float | None) -> bool:
    slow = expected_ms is not None and timing.reference_ms > expected_ms * DISTURBED_FACTOR
    return slow or timing.spread > max_spread


def _badness(timing: Timing, expected_ms: float | None) -> float:
    slowdown = timing.reference_ms / expected_ms - 1 if expected_ms else 0.0
    return max(timing.spread, slowdown)


def _interleaved(
    model: nn.Module,
    reference: nn.Module,
    inputs: Any,
    device: torch.device,
    warmup: int,
    repeats: int,
    threads: int | None,
    rounds: int,
) -> Timing:
    per_round = max(1, repeats // rounds)
    model_rounds: list[list[float]] = []
    reference_rounds: list[list[float]] = []
    inputs = to_device(inputs, device)
    with _timing(device, threads) as sync:
        for i in range(rounds):
            first = warmup if i == 0 else 2
            reference_rounds.append(_timed(reference, inputs, sync, first, per_round, []))
            model_rounds.append(_timed(model, inputs, sync, first, per_round, []))
    model_medians = [statistics.median(r) for r in model_rounds]
    reference_medians = [statistics.median(r) for r in reference_rounds]
    ratios = [r / m for r, m in zip(reference_medians, model_medians)]
    speedup = statistics.median(ratios)
    reference_ms = statistics.median(t for r in reference_rounds for t in r) * 1000.0
    return Timing(
        latency_ms=statistics.median(t for r in model_rounds for t in r) * 1000.0,
        reference_ms=reference_ms,
        speedup=speedup,
        spread=max(_relative_range(ratios), _relative_range(reference_medians)),
        attempts=1,
    )


def _relative_range(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


@contextlib.contextmanager
def _timing(device: torch.device, threads: int | None) -> Iterator[Callable[[], None]]:
    """The conditions every timing runs under; yields the device's synchronize. On the CPU,
    ``threads`` intra-op threads (default: every CPU this process may use), restored after."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or usable_cpus())
    try:
        yield torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    finally:
        torch.set_num_threads(previous)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one, e.g. not macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _timed(
    model: nn.Module, inputs: Any, sync: Any, warmup: int, repeats: int, times: list[float]
) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            call_model(model, inputs)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(model, inputs)
            sync()
            times.append(time.perf_counter() - start)
    return times


def _side_by_side(
    first: nn.Module,
    second: nn.Module,
    args: Any,
    kwargs: Any,
    sync: Callable[[], None],
    rounds: int = 5,
    per_round: int = 5,
) -> tuple[float, float]:
    """Seconds of one call of each of two layers on the same inputs: the first's median,
    and that times the median over interleaved rounds of the ratio of their round medians
    (a layer takes microseconds: a slow moment spans a round, and the median of the rounds
    leaves it out, as ``measure_latency_beside`` does for whole models)."""
    medians: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for layer in (first, second):
            layer(*args, **kwargs)
        for _ in range(rounds):
            for layer, found in zip((first, second), medians, strict=True):
                taken = []
                sync()
                for _ in range(per_round):
                    start = time.perf_counter()
                    layer(*args, **kwargs)
                    sync()
                    taken.append(time.perf_counter() - start)
                found.append(statistics.median(taken))
    base = statistics.median(medians[0])
    return base, base * statistics.median(b / a for a, b in zip(*medians, strict=True))


def measure_layers_beside(
    original: nn.Module,
    probed: nn.Module,
    inputs: dict[str, tuple[Any, Any]],
    device: torch.device,
    threads: int | None,
) -> tuple[float, float]:
    """(original, probed) milliseconds of the layers named in ``inputs`` (each with the
    (args, kwargs) it gets from the example input), summed, each layer of ``original``
    timed beside the same of ``probed`` (``_side_by_side``)."""
    pairs = {
        name: (original.get_submodule(name), probed.get_submodule(name), args, kwargs)
        for name, (args, kwargs) in inputs.items()
    }
    return measure_pairs_beside(pairs, device, threads)


def measure_pairs_beside(
    pairs: Mapping[str, tuple[nn.Module, nn.Module, Any, Any]],
    device: torch.device,
    threads: int | None,
) -> tuple[float, float]:
    """(original, probed) milliseconds of each (original, probed, args, kwargs), summed, each
    pair timed side by side (``_side_by_side``): a layer in torch, or alone in its own ONNX
    file in ONNX Runtime (``Evaluator.time_probe``)."""
    base = changed = 0.0
    with _timing(device, threads) as sync:
        for first, second, args, kwargs in pairs.values():
            b, p = _side_by_side(first, second, args, kwargs, sync)
            base, changed = base + b, changed + p
    return base * 1000.0, changed * 1000.0


def measure_memory(model: nn.Module, inputs: Any, device: torch.device) -> float:
    """Peak megabytes (1e6 bytes) of one forward pass: the model's weights in their execution
    form, the inputs, and the most memory the pass holds at once.

    The bytes of every tensor the model holds (packed int8/int4 weights at their real width)
    and of the inputs, plus the peak of the allocations made during the pass: on CUDA the
    allocator's peak above what was allocated before it (the process holds other models: the
    original, a probe copy), on the CPU replayed from PyTorch's profiler memory events.
    """
    inputs = to_device(inputs, device)
    resident = _held_bytes(model.state_dict(keep_vars=True)) + _held_bytes(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            call_model(model, inputs)
        torch.cuda.synchronize(device)
        return (resident + torch.cuda.max_memory_allocated(device) - before) / 1e6
    return (resident + _peak_allocated_cpu(model, inputs)) / 1e6


def _held_bytes(value: Any) -> int:
    """Bytes of the tensors in a state dict or input structure, each storage counted once."""
    held = {t.data_ptr() if not t.is_quantized else id(t): t for t in tensors(value)}
    return sum(t.numel() * t.element_size() for t in held.values())


def _peak_allocated_cpu(model: nn.Module, inputs: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    with silenced(STDERR), torch.inference_mode():
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
