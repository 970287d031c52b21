"""Unstructured pruning: a fraction of a layer's weights become 0, chosen by a criterion.

``prune_by: magnitude`` (the default) zeroes the smallest |w|. ``prune_by: activation`` zeroes
the smallest |w| x ||x||, where ||x|| is the norm of the input feature the weight multiplies
over the calibration batches (Wanda, Sun et al. 2023). It compares weights within each output
row, so every row loses the same share. A weight on a quiet input goes before a larger one on
a loud input. The norms are taken once per compression, on the model as it is when pruning
starts, from ``task.calibration`` (else the example input).

Zeros alone save nothing; the artifact stores a weight as a bitmap plus its nonzeros when
that is smaller than dense storage, which is where pruning's bytes are won.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from autosqueeze.kernels import is_conv1d
from autosqueeze.metrics import call_model, to_device
from autosqueeze.plan import LayerPlan
from autosqueeze.techniques.base import CompressedModel, Technique, matrices, weighted_parts

CRITERIA = ("magnitude", "activation")
NORM_BATCHES = 8
"""Calibration batches the input norms are taken over (Wanda used 128 sequences)."""


def prune_by_magnitude(weight: torch.Tensor, ratio: float) -> None:
    """Zero ``round(ratio * n)`` smallest-|w| entries in place (ties broken by position).

    A selection, not a sort: the count-th smallest magnitude is found in linear time (NumPy's
    introselect: 6 ms for a BERT-base FFN matrix, against 300 ms for a sort and 57 ms for
    ``torch.kthvalue``), then everything below it and, in index order, as many entries equal
    to it as the count needs: a stable sort's first ``count``."""
    count = round(ratio * weight.numel())
    if not count:
        return
    magnitude = weight.detach().abs().flatten()
    if magnitude.dtype == torch.bfloat16:  # NumPy has no bfloat16
        magnitude = magnitude.float()
    threshold = float(np.partition(magnitude.cpu().numpy(), count - 1)[count - 1])
    chosen = magnitude < threshold
    ties = torch.nonzero(magnitude == threshold).flatten()
    chosen[ties[: count - int(torch.count_nonzero(chosen))]] = True
    with torch.no_grad():
        weight.view(-1)[chosen] = 0


class Prune(Technique):
    knob = "prune"
    harm_grows_with_strength = True
    keeps_layer = True
    identity = 0.0

    def check_value(self, value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"prune is a fraction of weights in [0, 1), got {value}")

    def strength(self, value: Any) -> float:
        return float(value)  # the share of weights zeroed

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        if layer_plan.prune_by not in CRITERIA:
            raise ValueError(
                f"prune_by is one of {', '.join(CRITERIA)}, got {layer_plan.prune_by!r}"
            )
        by_activation = layer_plan.prune_by == "activation" and layer_plan.prune > 0
        norms = _input_norms(compressed) if by_activation else {}
        for part_name, part in weighted_parts(compressed.module, name):
            for key, matrix in matrices(part).items():
                if key == "weight" and part_name in norms:
                    prune_by_activation(part, norms[part_name], layer_plan.prune)
                else:  # an embedding, or attention's in_proj_weight: no input features
                    prune_by_magnitude(matrix, layer_plan.prune)


def prune_by_activation(layer: nn.Module, norms: torch.Tensor, ratio: float) -> None:
    """Zero, in each output row of ``layer.weight``, the ``round(ratio * row)`` entries of
    smallest |w| x norm of their input feature (ties broken by position)."""
    weight = layer.weight
    rows = weight.t() if is_conv1d(layer) else weight  # Conv1D stores (in, out)
    count = round(ratio * rows[0].numel())
    if not count:
        return
    score = rows.detach().abs().float() * _per_weight(layer, norms.to(weight.device))
    order = torch.argsort(score.reshape(rows.shape[0], -1), dim=1, stable=True)[:, :count]
    with torch.no_grad():
        flat = rows.reshape(rows.shape[0], -1) if rows.is_contiguous() else None
        if flat is not None:
            flat.scatter_(1, order, 0.0)
        else:  # Conv1D's transposed view: zero through a mask on the stored weight
            mask = torch.ones_like(score.reshape(rows.shape[0], -1))
            mask.scatter_(1, order, 0.0)
            weight.mul_(mask.reshape(rows.shape).t().to(weight.dtype))


def _per_weight(layer: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """The input norm of each weight of ``layer`` in (out, in, *kernel) order: a Linear's
    column, a convolution's input channel within its group."""
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        return norms[None, :]
    out_channels, per_group = layer.weight.shape[:2]
    group = torch.arange(out_channels, device=norms.device) // (out_channels // layer.groups)
    by_row = norms.reshape(layer.groups, per_group)[group]  # (out, in per group)
    return by_row.reshape(out_channels, per_group, *([1] * (layer.weight.dim() - 2)))


_NORMED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _input_norms(compressed: CompressedModel) -> dict[str, torch.Tensor]:
    """Per layer of the module (Linear, convolution, Conv1D): the L2 norm of each input
    feature (channel) over the calibration batches, taken once per compression."""
    if "input_norms" in compressed.scratch:
        return compressed.scratch["input_norms"]
    target = compressed.target
    batches = (target.calibration or [])[:NORM_BATCHES]
    if not batches and target.example_input is not None:
        batches = [target.example_input]
    if not batches:
        raise ValueError("prune_by activation needs task.calibration or an example input")
    module = compressed.module
    sums: dict[str, torch.Tensor] = {}

    def record(name: str, layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        if isinstance(layer, nn.Linear) or is_conv1d(layer):
            squares = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        else:  # channels at dim 1 (or 0 unbatched)
            channel = 1 if x.dim() == layer.weight.dim() else 0
            squares = x.pow(2).transpose(0, channel).reshape(x.shape[channel], -1).sum(1)
        sums[name] = sums.get(name, 0) + squares

    hooks = [
        layer.register_forward_pre_hook(lambda m, args, name=name: record(name, m, args))
        for name, layer in module.named_modules()
        if isinstance(layer, _NORMED) or is_conv1d(layer)
    ]
    device = next(module.parameters()).device
    try:
        with torch.inference_mode():
            for batch in batches:
                call_model(module, to_device(batch, device))
    finally:
        for hook in hooks:
            hook.remove()
    compressed.scratch["input_norms"] = {n: s.sqrt() for n, s in sums.items()}
    return compressed.scratch["input_norms"]
