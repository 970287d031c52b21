"""Statistics of layers' inputs over the calibration batches, for the techniques that weigh a
weight by what it multiplies: Wanda's and SparseGPT's pruning, error-compensating rounding,
activation smoothing. One forward pass takes a statistic for every layer that asks, so a plan
whose layers all want one pays for one pass, not one per layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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
) -> dict[str, torch.Tensor]:
    """``statistic(layer, input)`` over the calibration batches (else the example input),
    per layer named, on the model as it is now: summed, or joined batch by batch with
    ``combine`` (``torch.maximum`` for a range: squares add up over batches, a largest value
    does not). ``why`` names what needs them, for the message when there is nothing to
    calibrate on."""
    target = compressed.target
    batches = list(target.calibration or [])[:BATCHES]
    if not batches and target.example_input is not None:
        batches = [target.example_input]
    if not batches:
        raise ValueError(f"{why} needs task.calibration or an example input")
    module = compressed.module
    sums: dict[str, torch.Tensor] = {}

    def record(name: str, layer: nn.Module, args: tuple[object, ...]) -> None:
        first = args[0]
        assert isinstance(first, torch.Tensor)
        found = statistic(layer, first.detach().float())
        sums[name] = combine(sums[name], found) if name in sums else found

    hooks = [
        module.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: record(name, m, args)
        )
        for name in sorted(names)
    ]
    device = next(module.parameters()).device
    try:
        with torch.inference_mode():
            for batch in batches:
                call_model(module, to_device(batch, device))
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def input_hessians(
    compressed: CompressedModel, names: set[str], together: set[str], why: str
) -> dict[str, torch.Tensor]:
    """X^T X (float64) of the inputs of the Linear (or Conv1D) layers ``names``, taken in one
    pass with ``together`` (every layer the plan will ask for: its layers are changed in turn)
    and kept for the rest of this compression."""
    found = compressed.scratch.setdefault("input_hessians", {})
    if names - found.keys():

        def gram(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).double()
            return flat.T @ flat

        found.update(over_calibration(compressed, (together | names) - found.keys(), gram, why))
    return {n: found[n] for n in names if n in found}
