"""What each layer took and gave on the first samples: the sensitivity pass by layer's
reference (``sensitivity.by``).

A probe of the pass by layer judges the layers it changes alone: each runs on the inputs it
took in the original model, and its outputs are compared with the ones it gave. One forward
pass over the first samples records, per weighted layer, its calls (positional and keyword
inputs, output), whole, up to ``CAPTURE_BYTES`` a layer: a probe then costs its layers' time,
not the model's. Inputs and outputs are cloned as they pass, since what follows a layer may
change them in place (an in-place ReLU after a convolution).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autosqueeze.common.nested import map_tensors, tensors
from autosqueeze.usercode.metrics import call_model, distortion

CAPTURE_BYTES = 8 << 20
"""Inputs and outputs kept per layer: its first calls up to this many bytes (at least one)."""


@dataclass(frozen=True)
class Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]  # its output's floating tensors, in order


def record_calls(
    model: nn.Module, names: Iterable[str], inputs: Iterable[Any]
) -> dict[str, list[Call]]:
    """Per layer of ``names``: its calls as ``model`` runs on each of ``inputs`` (a layer the
    inputs never reach has none)."""
    found: dict[str, list[Call]] = {}
    held: dict[str, int] = {}
    handles = []

    def keep(name: str) -> Any:
        def hook(_: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if held.get(name, 0) >= CAPTURE_BYTES:
                return
            call = Call(
                map_tensors(torch.clone, args),
                map_tensors(torch.clone, kwargs),
                [t.clone() for t in _floating(output)],
            )
            held[name] = held.get(name, 0) + sum(
                t.numel() * t.element_size() for t in tensors((call.args, call.kwargs))
            )
            found.setdefault(name, []).append(call)

        return hook

    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(keep(name), with_kwargs=True))
    try:
        with torch.inference_mode():
            for x in inputs:
                call_model(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def relative_error(layer: nn.Module, calls: list[Call]) -> float | None:
    """``layer``'s outputs on the recorded calls' inputs, their squared error relative to the
    recorded outputs (``metrics.distortion``, of one layer); None where the layer never ran
    or its outputs do not line up."""
    with torch.inference_mode():
        got = [t for call in calls for t in _floating(layer(*call.args, **call.kwargs))]
    return distortion(got, [t for call in calls for t in call.outputs])


def _floating(output: Any) -> list[torch.Tensor]:
    return [t for t in tensors(output) if t.is_floating_point()]
