"""Structured pruning: remove a layer's least important output channels (neurons) for real.

Torch-Pruning's dependency graph finds every tensor coupled to those channels (the next
layer's inputs, BatchNorm statistics, the other branch of a residual add, ...) and shrinks
them all, so the model gets smaller tensors and fewer operations rather than masks. Channels
are ranked by the L2 norm of the layer's own weights for them. ``prune_channels`` is the
fraction of the layer's original outputs removed; a layer already narrowed as part of an
earlier layer's group is only pruned further when its own fraction asks for more. Layers whose
channels cannot go without changing the model's outputs (a classifier's logits, a
transformer's hidden size) are never offered.
"""

from __future__ import annotations

from typing import Any

import torch
from optuna.distributions import BaseDistribution
from torch import nn

from autosqueeze.compression.techniques.base import CompressedModel, Site
from autosqueeze.compression.techniques.dependency import (
    PRUNABLE,
    RemovesFraction,
    model_graph,
    once_per_model,
    out_channels,
    outputs,
    removable,
    width,
)
from autosqueeze.plans.knobs import KnobValues, to_distribution
from autosqueeze.plans.plan import LayerPlan


class PruneChannels(RemovesFraction):
    knob = "prune_channels"
    unit = "outputs"

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        layer = site.layer
        if not isinstance(layer, PRUNABLE) or getattr(layer, "groups", 1) != 1:
            return None
        if site.target.example_input is None or site.name not in _prunable_layers(site):
            return None
        return to_distribution(values)

    def why_not(self, site: Site) -> str:
        layer = site.layer
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            return "a transposed convolution keeps its channels"
        if not isinstance(layer, PRUNABLE):
            return ""
        groups = getattr(layer, "groups", 1)
        if groups != 1 and groups == layer.in_channels:
            return "a depthwise convolution's channels go with the layer feeding it"
        if groups != 1:
            return "a grouped convolution keeps its channels (its groups would not line up)"
        if site.target.example_input is None:
            return "needs task.calibration (an input to trace the model)"
        return (
            "its outputs cannot go alone (they reach the model's outputs or a layer that "
            "cannot lose them)"
        )

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        graph, widths = model_graph(compressed)
        layer = compressed.module.get_submodule(name)
        keep = max(1, widths[name] - round(layer_plan.prune_channels * widths[name]))
        surplus = width(layer) - keep
        if surplus <= 0:
            return
        every = list(range(width(layer)))
        scores = _importance(graph.get_pruning_group(layer, out_channels(layer), idxs=every))
        order = torch.argsort(scores, stable=True)[:surplus].tolist()
        graph.get_pruning_group(layer, out_channels(layer), idxs=order).prune()


def _importance(group: Any) -> torch.Tensor:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="first")(group)


def _prunable_layers(site: Site) -> set[str]:
    """Layers of the model whose output channels can go without changing the shapes the
    model outputs (found once per model). That rules out a classifier's logits, a
    transformer's hidden size (coupled to its outputs) and attention projections whose
    width must stay a multiple of the head count (``prune_heads`` removes those)."""

    def find() -> set[str]:
        model, example_input = site.model, site.target.example_input
        shapes = [t.shape for t in outputs(model, example_input)]
        candidates = {
            name: [0]
            for name, layer in model.named_modules()
            if isinstance(layer, PRUNABLE) and width(layer) > 1
        }

        def same_shapes(_original: nn.Module, pruned: nn.Module, _lost: Any) -> bool:
            return [t.shape for t in outputs(pruned, example_input)] == shapes

        return set(removable(model, example_input, candidates, same_shapes))

    return once_per_model(site.model, "channels", find)
