"""Attention-head pruning: remove an attention block's least important heads for real.

A query, key or value projection cannot lose single channels (its width must stay a whole
number of heads), but it can lose whole heads: Torch-Pruning's dependency graph narrows the
block's query, key and value projections and its output projection's inputs together, so the
block runs fewer heads, and its matrices shrink. ``prune_heads`` is the fraction of the
block's original heads removed (at least one head stays); heads are ranked by the L2 norm of
all their coupled weights.

It is offered on the first projection of each block whose module declares its head size
(``attention_head_size``, ``head_dim``, ...) or head count, and only where removing a head on
a copy gives exactly the outputs of the original with that head's contribution zeroed: a
model that splits its projections into a fixed number of heads (T5), fuses them into one
layer (GPT-2's ``Conv1D``, ``nn.MultiheadAttention``) or shares keys and values among
query heads (LLaMA's grouped-query attention) is not offered the knob rather than changed
into a different function.
"""

from __future__ import annotations

from typing import Any

import torch
from optuna.distributions import BaseDistribution
from torch import nn

from autosqueeze.knobs import KnobValues, to_distribution
from autosqueeze.plan import LayerPlan
from autosqueeze.techniques.base import CompressedModel, Site
from autosqueeze.techniques.dependency import (
    RemovesFraction,
    model_graph,
    once_per_model,
    out_channels,
    outputs,
    removable,
    width,
)

# what attention blocks call their head size, and their head count
_SIZE_NAMES = ("attention_head_size", "head_dim", "head_size", "key_value_proj_dim", "d_kv")
_COUNT_NAMES = ("num_attention_heads", "num_heads", "n_heads", "n_head")


class PruneHeads(RemovesFraction):
    knob = "prune_heads"
    unit = "heads"

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        if not isinstance(site.layer, nn.Linear) or site.target.example_input is None:
            return None
        if head_size(site.model, site.name) is None or site.name not in _block_leaders(site):
            return None
        return to_distribution(values)

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        graph, widths = model_graph(compressed)
        layer = compressed.module.get_submodule(name)
        size = head_size(compressed.module, name, widths[name])
        if size is None:
            raise ValueError(f"prune_heads: layer {name!r} is not an attention projection")
        heads = widths[name] // size
        keep = max(1, heads - round(layer_plan.prune_heads * heads))
        surplus = width(layer) // size - keep
        if surplus <= 0:
            return
        every = list(range(width(layer)))
        scores = _importance(graph.get_pruning_group(layer, out_channels(layer), idxs=every))
        weakest = torch.argsort(scores.view(-1, size).sum(1), stable=True)[:surplus]
        idxs = [h * size + i for h in sorted(weakest.tolist()) for i in range(size)]
        graph.get_pruning_group(layer, out_channels(layer), idxs=idxs).prune()


def head_size(model: nn.Module, name: str, original_width: int | None = None) -> int | None:
    """The head size of the attention block that layer ``name`` projects for, read from the
    block (its parent module), or None when the block declares none that fits the layer."""
    layer = model.get_submodule(name)
    block = model.get_submodule(name.rpartition(".")[0])
    full = original_width or width(layer)
    sizes = [getattr(block, a) for a in _SIZE_NAMES if isinstance(getattr(block, a, None), int)]
    sizes += [
        full // getattr(block, a)
        for a in _COUNT_NAMES
        if isinstance(getattr(block, a, None), int) and getattr(block, a) > 0
    ]
    return next((s for s in sizes if 0 < s < full and full % s == 0), None)


def _importance(group: Any) -> torch.Tensor:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")(group)


def _block_leaders(site: Site) -> set[str]:
    """Per attention block whose first head can go cleanly, its first projection in model
    order (the query, usually): the one layer that carries the block's knob."""

    def find() -> set[str]:
        model, example_input = site.model, site.target.example_input
        heads = {
            name: list(range(size))
            for name, layer in model.named_modules()
            if isinstance(layer, nn.Linear) and (size := head_size(model, name)) is not None
        }
        found = removable(model, example_input, heads, _same_as_zeroed(example_input))
        leaders: dict[frozenset[int], str] = {}
        for name, key in found.items():
            leaders.setdefault(key, name)
        return set(leaders.values())

    return once_per_model(site.model, "heads", find)


def _same_as_zeroed(example_input: Any) -> Any:
    """Whether a copy with a head removed computes what the original computes with that
    head's contribution zeroed (the output projection's inputs for it set to zero)."""

    def accept(original: nn.Module, pruned: nn.Module, lost: dict[str, list[int]]) -> bool:
        if not lost:
            return False
        zeroed = _copy_with_inputs_zeroed(original, lost)
        want, got = outputs(zeroed, example_input), outputs(pruned, example_input)
        return len(want) == len(got) and all(
            w.shape == g.shape and torch.allclose(w, g, rtol=1e-3, atol=1e-5 * (1 + w.abs().max()))
            for w, g in zip(want, got, strict=True)
        )

    return accept


def _copy_with_inputs_zeroed(model: nn.Module, lost: dict[str, list[int]]) -> nn.Module:
    import copy

    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, idxs in lost.items():
            zeroed.get_submodule(name).weight[:, idxs] = 0
    return zeroed
