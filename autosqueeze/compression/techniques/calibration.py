"""Statistics of layers' inputs over the calibration batches, for the techniques that weigh a
weight by what it multiplies: Wanda's and SparseGPT's pruning, error-compensating rounding,
activation smoothing. One forward pass takes a statistic for every layer that asks, so a plan
whose layers all want one pays for one pass, not one per layer.

Input Hessians (X^T X) are also kept across compressions (``_HESSIANS``): computing them is
most of a pass (22 s for every Linear of MiniLM on 512 sentences, one thread, on this machine,
against 6 s for the forward alone), and a search asks for the same ones trial after trial. A
layer's inputs depend only on the calibration batches and on the modules that ran before it
in the forward pass, so its Hessian is kept under the content of exactly those: the batches,
the layer's class and ``extra_repr`` (a convolution's kernel and groups shape its Hessian),
and the own parameters, buffers, class and ``extra_repr`` of every module that started
before the layer's last call in a batch, and of those modules' descendants that never ran
(whose weights a parent may read directly: ``nn.MultiheadAttention``'s ``out_proj``).
Pruning or quantizing a layer, or any change after it, leaves its Hessian where it was; a
change before it gives a new one. What such a key misses is state outside modules'
parameters and buffers that changes without them (a plain attribute set on a module between
compressions, a global flag of the model's code): nothing in autosqueeze does that.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from autosqueeze.common.content_cache import ContentCache, content_key
from autosqueeze.common.nested import map_leaves
from autosqueeze.compression.techniques.base import CompressedModel
from autosqueeze.usercode.metrics import call_model, to_device

BATCHES = 8
"""Calibration batches a statistic is taken over (Wanda used 128 sequences, GPTQ 128)."""

Statistic = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def over_calibration(
    compressed: CompressedModel,
    names: set[str],
    statistic: Statistic,
    why: str,
    combine: Combine = torch.add,
    *,
    calls: list[list[str]] | None = None,
    readers: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """``statistic(layer, input)`` over the calibration batches (else the example input),
    per layer named, on the model as it is now: summed, or joined batch by batch with
    ``combine`` (``torch.maximum`` for a range: squares add up over batches, a largest value
    does not). ``why`` names what needs them, for the message when there is nothing to
    calibrate on. With ``calls``, a list per batch is appended to it, of the name of every
    module whose forward starts, in order. With ``readers``, each layer named that ran is
    mapped to the first of them (in the order they ran) whose first call read the very same
    input tensor as its own first call (the same object: an attention's query, key and value
    reading one norm's output), itself where none did."""
    batches = _batches(compressed, why)
    module = compressed.module
    sums: dict[str, torch.Tensor] = {}
    read: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}  # id -> (tensor, first reader)

    def record(name: str, layer: nn.Module, args: tuple[object, ...]) -> None:
        first = args[0]
        assert isinstance(first, torch.Tensor)
        if readers is not None and name not in sums:  # its first call, in the first batch
            # a weak reference: an id is reused once its tensor is freed, an object is not
            known = read.get(id(first))
            if known is None or known[0]() is not first:
                known = read[id(first)] = (weakref.ref(first), name)
            readers[name] = known[1]
        found = statistic(layer, first.detach().float())
        sums[name] = combine(sums[name], found) if name in sums else found

    hooks = [
        module.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: record(name, m, args)
        )
        for name in sorted(names)
    ]
    if calls is not None:
        hooks += [
            part.register_forward_pre_hook(lambda m, args, name=name: calls[-1].append(name))
            for name, part in module.named_modules()
        ]
    device = next(module.parameters()).device
    try:
        with torch.inference_mode():
            for batch in batches:
                if calls is not None:
                    calls.append([])
                call_model(module, to_device(batch, device))
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def _batches(compressed: CompressedModel, why: str) -> list[Any]:
    target = compressed.target
    batches = list(target.calibration or [])[:BATCHES]
    if not batches and target.example_input is not None:
        batches = [target.example_input]
    if not batches:
        raise ValueError(f"{why} needs task.calibration or an example input")
    return batches


def input_hessians(
    compressed: CompressedModel,
    names: set[str],
    together: set[str],
    why: str,
    *,
    taken: str = "pruning",
) -> dict[str, torch.Tensor]:
    """X^T X (float64) of the inputs of layers ``names`` as their weight matrices multiply
    them: a Linear's or Conv1D's input features; a 1-D or 2-D convolution's unfolded input
    patches (``unfolded``), one matrix per conv group, stacked. Taken in one pass with
    ``together`` (every layer the plan asks for at this step: its layers are changed in
    turn), on the model as it is when the step ``taken`` starts, kept for the rest of this
    compression, and across compressions by the content of what the inputs depend on (the
    module docstring). Shared, so read only. A layer that never runs has none."""
    found = compressed.scratch.setdefault(f"input_hessians {taken}", {})
    if names - found.keys():
        wanted = (together | names) - found.keys()
        got = _kept_hessians(compressed, wanted, why)
        found.update({name: got.get(name) for name in wanted})
    return {n: found[n] for n in names if found.get(n) is not None}


_HESSIANS: ContentCache[torch.Tensor] = ContentCache(
    1 << 30, lambda h: h.numel() * h.element_size()
)
_UPSTREAM: dict[tuple[bytes, str], list[tuple[str, ...]]] = {}
"""(calibration, layer) -> the modules the passes that computed its Hessian found its inputs
to depend on (the latest few: a structural change before the layer changes them)."""
UPSTREAM_KEPT = 4
_SILENT: ContentCache[bool] = ContentCache(1 << 12, lambda _: 1)
"""Layers a pass never called, by calibration and the whole model's state."""


def _kept_hessians(
    compressed: CompressedModel, names: set[str], why: str
) -> dict[str, torch.Tensor]:
    """The Hessians of ``names``: kept ones where what their inputs depend on is as it was,
    the rest from one pass (which also finds what their inputs depend on)."""
    module = compressed.module
    device = next(module.parameters()).device
    calibration = _calibration_key(_batches(compressed, why), device)
    states = _ModuleStates(module)
    got = {}
    for name in sorted(names):
        for upstream in _UPSTREAM.get((calibration, name), []):
            key = states.key(calibration, name, upstream)
            if key is not None and key in _HESSIANS:
                got[name] = _HESSIANS.get(key, _never)
                break
    everything = tuple(sorted(states.modules))
    missing = {
        n for n in names - got.keys() if states.key(calibration, n, everything) not in _SILENT
    }
    if missing:
        calls: list[list[str]] = []
        sums = over_calibration(compressed, missing, _gram, why, calls=calls)
        for name in missing - sums.keys():  # never called: none until the model changes
            _SILENT.put(states.key(calibration, name, everything), True)
        for name, hessian in sums.items():
            upstream = _upstream(module, calls, name)
            seen = _UPSTREAM.setdefault((calibration, name), [])
            if upstream in seen:
                seen.remove(upstream)
            seen.insert(0, upstream)
            del seen[UPSTREAM_KEPT:]
            key = states.key(calibration, name, upstream)
            assert key is not None  # its modules are the module's own
            _HESSIANS.put(key, hessian)
            got[name] = hessian
    return got


def _never() -> torch.Tensor:
    raise AssertionError("asked for a Hessian the cache was just seen to hold")


def hessians_kept() -> int:
    """How many input Hessians are kept across compressions now."""
    return len(_HESSIANS)


def _calibration_key(batches: list[Any], device: torch.device) -> bytes:
    """The batches' content (every tensor's, the structure around them) and the device the
    pass runs on (its arithmetic differs)."""

    def leaf(value: Any) -> str:
        return content_key(value).hex() if isinstance(value, torch.Tensor) else repr(value)

    text = f"{device}|{map_leaves(leaf, batches)!r}"
    return hashlib.sha256(text.encode()).digest()


def _upstream(module: nn.Module, calls: list[list[str]], name: str) -> tuple[str, ...]:
    """The modules layer ``name``'s inputs can depend on: those whose forward started before
    its last call of a batch's forward (``calls``: per batch, the modules as they started),
    and the descendants of those that never ran (read, not called)."""
    before: set[str] = set()
    for started in calls:
        if name in started:
            last = len(started) - 1 - started[::-1].index(name)
            before.update(started[:last])
    ran = {m for started in calls for m in started}
    silent = {
        n for n, _ in module.named_modules() if n not in ran and _ran_parent(n, ran) in before
    }
    return tuple(sorted(before | silent))


def _ran_parent(name: str, ran: set[str]) -> str | None:
    """The nearest ancestor of module ``name`` that ran (the root is "")."""
    while name:
        name = name.rpartition(".")[0]
        if name in ran:
            return name
    return None


class _ModuleStates:
    """Each module's own state as a digest (its class, ``extra_repr``, mode, and its own
    parameters' and buffers' content), taken once per module and compression step."""

    def __init__(self, module: nn.Module) -> None:
        self.modules = dict(module.named_modules())
        self.digests: dict[str, bytes] = {}

    def form(self, name: str) -> bytes:
        """What the module is, without its values: its class, ``extra_repr`` and mode."""
        module = self.modules[name]
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        return f"{kind}|{module.extra_repr()}|{module.training}".encode()

    def own(self, name: str) -> bytes | None:
        if name not in self.digests:
            if name not in self.modules:
                return None
            module = self.modules[name]
            h = hashlib.sha256(self.form(name))
            for key, tensor in (*module._parameters.items(), *module._buffers.items()):
                h.update(key.encode() + (content_key(tensor) if tensor is not None else b"-"))
            self.digests[name] = h.digest()
        return self.digests[name]

    def key(self, calibration: bytes, name: str, upstream: tuple[str, ...]) -> bytes | None:
        """The cache key of layer ``name``'s Hessian given what its inputs depend on (and what
        the layer is: a convolution's shape and groups shape its Hessian); None when one of
        those modules is gone."""
        h = hashlib.sha256(calibration + name.encode() + b"|" + self.form(name))
        for m in upstream:
            digest = self.own(m)
            if digest is None:
                return None
            h.update(m.encode() + b"|" + digest)
        return h.digest()


ROWS_AT_ONCE = 4096
"""Rows of inputs turned into float64 at a time for X^T X (bounds the memory it takes)."""


def _gram(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """X^T X of one input, in float64: (in, in) for a Linear or Conv1D, (groups, d, d) for a
    convolution (d: in/groups x its kernel)."""
    rows = unfolded(layer, x) if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else None
    if rows is None:
        rows = x.reshape(1, -1, x.shape[-1])
    total = torch.zeros(rows.shape[0], rows.shape[2], rows.shape[2], dtype=torch.float64)
    total = total.to(x.device)
    for chunk in rows.split(ROWS_AT_ONCE, dim=1):
        wide = chunk.double()
        total += wide.transpose(1, 2) @ wide
    return total if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else total[0]


def unfolded(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as its weight, seen as (out, in/groups x kernel) matrices one conv
    group at a time, multiplies it: (groups, patches, in/groups x kernel), each patch's
    values in the weight's order (channel, then kernel position), padded as the layer pads."""
    conv = cast("nn.Conv1d | nn.Conv2d", layer)
    if x.dim() == conv.weight.dim() - 1:  # one unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    if isinstance(conv, nn.Conv1d):  # a one-row image
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
    patches = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, in x kernel, P)
    groups = conv.groups
    per_group = patches.reshape(x.shape[0], groups, -1, patches.shape[-1])
    return per_group.permute(1, 0, 3, 2).reshape(groups, -1, per_group.shape[2])


__all__ = ["BATCHES", "hessians_kept", "input_hessians", "over_calibration", "unfolded"]
