"""Layer timings kept across layers and studies, per device.

The latency model times each layer whose execution a probe changes (a kernel, a rank) beside
the original layer. That time depends on the layer's type, its weights' shapes and dtypes,
its inputs' shapes, what the plan does to it and the device, not on which model holds it or
where: MiniLM's 36 searchable Linear layers have 4 shapes, and a second study of the same
model (or of BERT, whose layers share them) needs none timed again. So the pass times one
probe per *signature* and keeps each result in a file per user and device, as torchao's
former ``autoquant`` kept its per-shape timings.

A timing is two numbers taken side by side (the original layer's and the probed layer's
milliseconds), so it holds on a busy machine as well as the pass's own. The file is the
user's (``$AUTOSQUEEZE_CACHE_DIR``, else ``$XDG_CACHE_HOME/autosqueeze``, else
``~/.cache/autosqueeze``) and is still read as untrusted: entries that are not two positive
finite numbers are ignored, and a file that does not parse is set aside, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autosqueeze.common.content_cache import cache_dir
from autosqueeze.common.nested import leaves
from autosqueeze.compression.techniques import runs_differently
from autosqueeze.measuring.measure import ProbeResult, usable_cpus
from autosqueeze.plans.plan import Plan
from autosqueeze.usercode.metrics import call_model

if TYPE_CHECKING:
    from autosqueeze.problem.task import Task

FORMAT = 1
"""Bumped when what a timing means changes: older entries are then never matched."""
FILE = "layer-timings.json"
MAX_ENTRIES = 100_000
"""A file holding more is not read (a few hundred per model is usual)."""


def device_signature(device: torch.device, threads: int | None, runtime: str = "torch") -> str:
    """What a timing was taken on: the processor (or GPU) model, the threads it used, and
    the torch build (a new build may bring new kernels); for a layer timed alone in ONNX
    Runtime (``budgets.runtime``), its version too."""
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    threads = threads or usable_cpus()
    found = f"{device.type}|{name}|threads={threads}|torch={torch.__version__}|format={FORMAT}"
    if runtime == "onnxruntime":
        import onnxruntime

        found += f"|onnxruntime={onnxruntime.__version__}"
    return found


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


class TimingCache:
    """(original, probed) milliseconds by signature, read from and merged into one file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, tuple[float, float]] = _read(path) if path else {}
        self._new: dict[str, tuple[float, float]] = {}

    def get(self, key: str) -> tuple[float, float] | None:
        return self._new.get(key) or self._entries.get(key)

    def put(self, key: str, original_ms: float, probed_ms: float) -> None:
        """Keep a timing, unless one with a faster original is kept already: a disturbance
        only slows a timing, so the fastest is the least disturbed, and one taken on a busy
        day does not stay for good."""
        kept = self.get(key)
        if _valid([original_ms, probed_ms]) and (kept is None or original_ms < kept[0]):
            self._new[key] = (float(original_ms), float(probed_ms))

    def save(self) -> None:
        """Merge the new timings into the file as it is now (another study may have added
        some) and swap it in whole: a reader never sees half a file."""
        if self.path is None or not self._new:
            return
        merged = _read(self.path, quiet=True)
        for key, timing in self._new.items():
            if key not in merged or timing[0] < merged[key][0]:
                merged[key] = timing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(dir=self.path.parent, prefix=".timings-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"format": FORMAT, "timings": merged}, out)
            os.replace(staging, self.path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        self._entries, self._new = merged, {}


def _valid(values: Any) -> bool:
    return (
        isinstance(values, (list, tuple))
        and len(values) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        and all(math.isfinite(v) and v > 0 for v in values)
    )


def _read(path: Path, quiet: bool = False) -> dict[str, tuple[float, float]]:
    if not path.exists():
        return {}
    try:
        if path.stat().st_size > MAX_ENTRIES * 200:
            raise ValueError("it is larger than a timing cache grows")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("timings"), dict):
            raise ValueError("it is not a timing cache")
    except (OSError, ValueError) as exc:
        if not quiet:  # said once, when read
            warnings.warn(f"the layer timing cache {path} is ignored: {exc}", stacklevel=3)
        return {}
    if data.get("format") != FORMAT:
        return {}
    return {
        k: (float(v[0]), float(v[1]))
        for k, v in data["timings"].items()
        if isinstance(k, str) and len(k) == 64 and _valid(v)
    }


def probe_signatures(
    model: nn.Module, example_input: Any, plans: dict[str, Plan], device_sig: str
) -> dict[str, str | None]:
    """Per plan, the signature of the timing it asks for: a hash of the device and, for
    each layer it runs differently, the layer's type and settings (``extra_repr``: a
    convolution's stride, padding, groups), its tensors' shapes and dtypes, its inputs'
    (from one forward pass on ``example_input``) and its plan. Equal signatures time
    the same. None where a layer it changes never runs on the input (nothing to time)."""
    wanted = {n for p in plans.values() for n, lp in p.layers.items() if runs_differently(lp)}
    inputs: dict[str, str] = {}

    def seen(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any, kwargs: Any) -> None:
            inputs.setdefault(name, _shapes((args, kwargs)))

        return hook

    hooks = [
        model.get_submodule(name).register_forward_pre_hook(seen(name), with_kwargs=True)
        for name in sorted(wanted)
    ]
    try:
        with torch.inference_mode():
            call_model(model, example_input)
    finally:
        for hook in hooks:
            hook.remove()
    found: dict[str, str | None] = {}
    for key, plan in plans.items():
        layers: list[list[Any]] | None
        layers = []
        for name, lp in sorted(plan.layers.items()):
            if not runs_differently(lp):
                continue
            if name not in inputs:
                layers = None
                break
            module = model.get_submodule(name)
            kind = f"{type(module).__module__}.{type(module).__qualname__}({module.extra_repr()})"
            tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in module.state_dict().items()]
            layers.append([kind, tensors, inputs[name], lp.to_dict()])
        if not layers:
            found[key] = None
            continue
        text = json.dumps([device_sig, sorted(layers, key=json.dumps)], default=str)
        found[key] = hashlib.sha256(text.encode()).hexdigest()
    return found


def _shapes(value: Any) -> str:
    return json.dumps(
        [
            [list(v.shape), str(v.dtype)] if isinstance(v, torch.Tensor) else type(v).__name__
            for v in leaves(value)
        ]
    )


Timings = Callable[[dict[str, Plan]], Iterator[tuple[str, ProbeResult]]]


def cached_timings(
    timings: Timings,
    cache: TimingCache,
    signatures: Callable[[dict[str, Plan]], dict[str, str | None]],
) -> Timings:
    """``timings`` (an executor's) that time one plan per signature the cache lacks, answer
    the rest from the cache and keep what they timed. One plan is timed even when every
    signature is known: its result brings the evaluator's time of the whole model."""

    def run(plans: dict[str, Plan]) -> Iterator[tuple[str, ProbeResult]]:
        signature = signatures(plans)
        sharing: dict[str, list[str]] = {}
        todo: dict[str, Plan] = {}
        known: list[tuple[str, tuple[float, float]]] = []
        for key, plan in plans.items():
            sig = signature.get(key)
            hit = cache.get(sig) if sig else None
            if hit is not None:
                known.append((key, hit))
            elif sig is None:
                todo[key] = plan
            elif sig not in sharing:
                sharing[sig] = []
                todo[key] = plan
            else:
                sharing[sig].append(key)
        forced: dict[str, tuple[float, float]] = {}
        if not todo and known:  # the whole model's time comes with a timing: take one
            key, hit = known.pop(0)
            todo[key], forced[key] = plans[key], hit
        model_ms: float | None = None
        try:
            for key, got in timings(todo):
                model_ms = got.model_ms or model_ms
                sig = signature.get(key)
                if key in forced:  # its layers' time as kept: a second study repeats the first
                    got = replace(got, layer_ms=forced[key], error=None)
                elif sig and got.layer_ms is not None and got.error is None:
                    cache.put(sig, *got.layer_ms)
                yield key, got
                for other in sharing.get(sig, []) if sig else []:
                    yield other, got
        finally:
            cache.save()
        for key, hit in known:
            yield key, ProbeResult(layer_ms=hit, model_ms=model_ms)

    return run


def user_cached(timings: Timings, task: Task, threads: int | None) -> Timings:
    """``timings`` through the user's cache file, for ``task``'s model on its device."""
    device = device_signature(task.device, threads, task.runtime)
    return cached_timings(
        timings,
        TimingCache(cache_dir() / FILE),
        lambda plans: probe_signatures(task.model, task.example_input, plans, device),
    )
