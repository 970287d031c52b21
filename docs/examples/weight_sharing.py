"""A technique registered from outside autosqueeze: weight sharing, Deep Compression's
clustering. Each layer's weights take the nearest of ``share`` values found by 1-D k-means;
quantized after it (``bits``), a row holds at most ``share`` levels, which the artifact's
Huffman-coded layout stores in about log2(share) bits a weight. ``docs/extending.md`` walks
through it, and ``tests/test_extending.py`` runs it."""

from __future__ import annotations

import math
from typing import Any

import torch

from autosqueeze.compression.techniques import register
from autosqueeze.compression.techniques.base import (
    CompressedModel,
    Technique,
    matrices,
    weighted_parts,
)
from autosqueeze.examples.digits import pretrained_cnn
from autosqueeze.plans.plan import LayerPlan


def share_values(weight: torch.Tensor, count: int, rounds: int = 25) -> None:
    """Replace ``weight``'s values (in place) by the nearest of ``count`` centroids, found by
    Lloyd's iterations from evenly spaced quantiles: deterministic, so a plan gives one
    artifact."""
    flat = weight.detach().flatten().float()
    centroids = torch.quantile(flat[:: max(1, flat.numel() // 65536)], torch.linspace(0, 1, count))
    for _ in range(rounds):
        edges = (centroids[1:] + centroids[:-1]) / 2
        nearest = torch.bucketize(flat, edges)
        sums = torch.zeros(count).index_add_(0, nearest, flat)
        counts = torch.bincount(nearest, minlength=count).float()
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
    nearest = torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)
    with torch.no_grad():
        weight.copy_(centroids[nearest].view_as(weight).to(weight.dtype))


@register
class ShareWeights(Technique):
    """``share: 0`` leaves a layer alone; ``share: k`` gives its weights k shared values."""

    knob = "share"
    identity = 0
    keeps_layer = True  # values change where they are: tied weights stay tied

    def check_value(self, value: Any) -> None:
        if value != 0 and not (float(value).is_integer() and 2 <= value <= 256):
            raise ValueError(f"share is 0 (off) or a count of shared values in 2-256, got {value}")

    def strength(self, value: Any) -> float:
        return 0.0 if value == 0 else 1.0 - math.log2(value) / 9  # 2 values: 0.89

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        for _, part in weighted_parts(compressed.module, name):
            for matrix in matrices(part).values():
                share_values(matrix, int(layer_plan.share))


def model() -> torch.nn.Module:
    """The config's ``model.factory``: importing this module registers the technique, in the
    search and in every evaluator that loads the model."""
    return pretrained_cnn()
