"""Unstructured magnitude pruning: the smallest-magnitude fraction of a layer's weights become 0.

Zeros alone save nothing; the artifact stores a weight as a bitmap plus its nonzeros when
that is smaller than dense storage, which is where pruning's bytes are won.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from autosqueeze.plan import LayerPlan
from autosqueeze.techniques.base import CompressedModel, Technique, matrices, weighted_parts


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
        for _, part in weighted_parts(compressed.module, name):
            for matrix in matrices(part).values():
                prune_by_magnitude(matrix, layer_plan.prune)
