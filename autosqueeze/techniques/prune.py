"""Unstructured magnitude pruning: the smallest-magnitude fraction of a layer's weights become 0.

Zeros alone save nothing; the artifact stores a weight as a bitmap plus its nonzeros when
that is smaller than dense storage, which is where pruning's bytes are won.
"""

from __future__ import annotations

from typing import Any

import torch

from autosqueeze.plan import LayerPlan
from autosqueeze.techniques.base import CompressedModel, Technique, weighted_parts


def prune_by_magnitude(weight: torch.Tensor, ratio: float) -> None:
    """Zero ``round(ratio * n)`` smallest-|w| entries in place (ties broken by position)."""
    count = round(ratio * weight.numel())
    if count:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        with torch.no_grad():
            weight.view(-1)[order[:count]] = 0


class Prune(Technique):
    knob = "prune"
    identity = 0.0

    def check_value(self, value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"prune is a fraction of weights in [0, 1), got {value}")

    def most_compressed(self, values: list[Any]) -> Any:
        return max(values)

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        for _, part in weighted_parts(compressed.module, name):
            prune_by_magnitude(part.weight, layer_plan.prune)
