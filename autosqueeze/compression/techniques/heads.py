"""Attention-head pruning: remove an attention block's least important heads for real.

A query, key or value projection cannot lose single channels (its width must stay a whole
number of heads), but it can lose whole heads: Torch-Pruning's dependency graph narrows the
block's query, key and value projections and its output projection's inputs together, so the
block runs fewer heads, and its matrices shrink. ``prune_heads`` is the fraction of the
block's original heads removed (at least one head stays); heads are ranked by the L2 norm of
all their coupled weights.

Two routes, by the block's structure:

- A block that holds its own four projections (query, key, value and output: LLaMA, Mistral,
  Qwen2, BART, Whisper, HF ViT) is narrowed directly, without the graph. Where keys and
  values serve several query heads (grouped-query attention), a key/value head goes with
  its whole group of query heads, so every remaining query head keeps the key and value it
  had. Its knob sits on the block's first projection.
- Otherwise (BERT: the output projection lives in a sibling module) Torch-Pruning's graph
  finds what is coupled; the knob sits on the block's first projection in model order.

Either way it is offered only where the block declares its head size (``head_dim``,
``attention_head_size``, ...) or head count, and where removing a head (a group) on a copy
gives exactly the outputs of the original with its contribution zeroed: a model that splits
its projections into a fixed number of heads (T5, DistilBERT) or fuses them into one layer
(GPT-2's ``Conv1D``, ``nn.MultiheadAttention``) is not offered the knob rather than changed
into a different function.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any, cast

import torch
from optuna.distributions import BaseDistribution
from torch import nn

from autosqueeze.compression.kernels import is_conv1d
from autosqueeze.compression.techniques.base import CompressedModel, Site
from autosqueeze.compression.techniques.dependency import (
    RemovesFraction,
    model_graph,
    once_per_model,
    original_widths,
    out_channels,
    outputs,
    removable,
    width,
)
from autosqueeze.plans.knobs import KnobValues, to_distribution
from autosqueeze.plans.plan import LayerPlan

# what attention blocks call their head size, and their head count
_SIZE_NAMES = ("attention_head_size", "head_dim", "head_size", "key_value_proj_dim", "d_kv")
_COUNT_NAMES = ("num_attention_heads", "num_heads", "n_heads", "n_head")


class PruneHeads(RemovesFraction):
    knob = "prune_heads"
    unit = "heads"

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        if not isinstance(site.layer, nn.Linear) or site.target.example_input is None:
            return None
        if head_size(site.model, site.name) is None or fused_projection(site.model, site.name):
            return None
        projections = own_projections(site.model, site.name)
        if projections is not None:
            offered = site.name in _direct_blocks(site.model, site.target.example_input)
        else:
            offered = site.name in _block_leaders(site)
        return to_distribution(values) if offered else None

    def why_not(self, site: Site) -> str:
        layer = site.layer
        if is_conv1d(layer):
            rows, cols = cast(torch.Tensor, layer.weight).shape  # stored (in, out)
            if cols == 3 * rows:
                return "a fused query-key-value projection: its heads are not cut apart"
        if not isinstance(layer, nn.Linear) or site.target.example_input is None:
            return ""
        if fused := fused_projection(site.model, site.name):
            return f"{fused} makes the block's projections in one Linear: its heads stay together"
        projections = own_projections(site.model, site.name)
        if projections is None or projections.first != site.name:
            return ""  # not an attention block's first projection, or one left to Torch-Pruning
        return "removing a head does not compute what zeroing it does (the block fixes its count)"

    def needs_graph(self, model: nn.Module, name: str) -> bool:
        return own_projections(model, name) is None

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        projections = own_projections(compressed.module, name)
        if projections is not None:
            if name != projections.first:
                raise ValueError(f"prune_heads: the block's knob is on {projections.first!r}")
            groups = original_widths(compressed)[projections.key] // projections.head_size
            keep = max(1, groups - round(layer_plan.prune_heads * groups))
            projections.remove_groups(compressed.module, keep)
            return
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


@dataclass(frozen=True)
class OwnProjections:
    """An attention block's own four projections, found by structure: three from the input
    (the widest is the query; the two others, keys and values, may serve several query
    heads each) and, defined last, the output, which reads the query's width."""

    first: str  # in definition order: the layer that carries the block's knob
    query: str
    key: str
    value: str
    output: str
    head_size: int

    def remove_groups(self, model: nn.Module, keep: int) -> list[int]:
        """Keep the ``keep`` strongest key/value heads, each with its group of query heads
        (by the L2 norm of all their weights, each layer's share of its own total); return
        the query channels removed (the output's inputs)."""
        q, k, v, o = (cast(nn.Linear, model.get_submodule(n)) for n in self.names)
        size, groups = self.head_size, width(k) // self.head_size
        per_group = width(q) // groups  # query rows per key/value head
        if keep >= groups:
            return []
        scores = sum(
            _shares(layer.weight.detach(), rows, per)
            for layer, rows, per in ((q, True, per_group), (k, True, size), (v, True, size))
        ) + _shares(o.weight.detach(), False, per_group)
        kept = sorted(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())
        query_idx = [g * per_group + i for g in kept for i in range(per_group)]
        key_idx = [g * size + i for g in kept for i in range(size)]
        _keep_outputs(q, query_idx)
        _keep_outputs(k, key_idx)
        _keep_outputs(v, key_idx)
        _keep_inputs(o, query_idx)
        return sorted(set(range(groups * per_group)) - set(query_idx))

    @property
    def names(self) -> tuple[str, str, str, str]:
        return self.query, self.key, self.value, self.output


def fused_projection(model: nn.Module, name: str) -> str | None:
    """The one Linear that makes query, key and value together in the attention block that
    layer ``name`` belongs to (Phi-3's ``qkv_proj``, GPT-NeoX's and Falcon's
    ``query_key_value``), found by structure: a block of two Linears, one wider than the
    other (the output projection) reads. Their layouts differ by family (heads interleaved or
    not), so their heads are not cut; and Torch-Pruning's graph is not asked (it runs
    past its limit on rotary embeddings)."""
    parent = name.rpartition(".")[0]
    linears = [
        (f"{parent}.{n}" if parent else n, m)
        for n, m in model.get_submodule(parent).named_children()
        if isinstance(m, nn.Linear)
    ]
    if len(linears) != 2 or head_size(model, name) is None:
        return None
    for (fused, qkv), (_, out) in (linears, linears[::-1]):
        if width(qkv) > out.in_features and qkv.in_features == width(out):
            return fused
    return None


def own_projections(model: nn.Module, name: str) -> OwnProjections | None:
    """The projections of the block that layer ``name`` belongs to, when it holds its own
    four (whichever of them ``name`` is), else None."""
    parent = name.rpartition(".")[0]
    linears = [
        (f"{parent}.{n}" if parent else n, m)
        for n, m in model.get_submodule(parent).named_children()
        if isinstance(m, nn.Linear)
    ]
    size = head_size(model, linears[0][0]) if len(linears) == 4 else None
    if size is None:
        return None
    inputs, (output, o) = linears[:3], linears[3]
    query, q = max(inputs, key=lambda nl: width(nl[1]))  # the first of equals
    (key, k), (value, v) = [nl for nl in inputs if nl[0] != query]
    fits = (
        o.in_features == width(q)
        and width(k) == width(v)
        and width(k) % size == 0
        and width(q) % width(k) == 0
        and q.in_features == k.in_features == v.in_features
    )
    return OwnProjections(linears[0][0], query, key, value, output, size) if fits else None


def _shares(weight: torch.Tensor, rows: bool, per: int) -> torch.Tensor:
    """Each unit's share of the squared weights (units of ``per`` rows, or columns)."""
    squares = (weight if rows else weight.T).float().pow(2)
    return squares.reshape(-1, per * squares.shape[1]).sum(1) / squares.sum().clamp_min(1e-30)


def _keep_outputs(layer: nn.Linear, idx: list[int]) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[idx].clone(), layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[idx].clone(), layer.bias.requires_grad)
    layer.out_features = len(idx)


def _keep_inputs(layer: nn.Linear, idx: list[int]) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[:, idx].clone(), layer.weight.requires_grad)
    layer.in_features = len(idx)


_DIRECT: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _direct_blocks(model: nn.Module, inputs: Any) -> set[str]:
    """The first projections of the blocks whose heads can go directly: where removing one
    key/value group computes what the original computes with it zeroed. Checked on one copy
    for all blocks at once, then block by block where that fails (models mix blocks)."""
    if model not in _DIRECT:
        found = {
            p.first: p
            for name, layer in model.named_modules()
            if isinstance(layer, nn.Linear) and (p := own_projections(model, name)) is not None
        }
        passing = set(found) if _zeroing_matches(model, found, inputs) else set()
        if not passing and len(found) > 1:
            passing = {n for n, p in found.items() if _zeroing_matches(model, {n: p}, inputs)}
        _DIRECT[model] = passing
    return _DIRECT[model]


def _zeroing_matches(
    model: nn.Module, blocks: dict[str, OwnProjections], example_input: Any
) -> bool:
    pruned, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    try:
        with torch.no_grad():
            for p in blocks.values():
                groups = width(model.get_submodule(p.key)) // p.head_size
                if groups < 2:
                    return False
                output = cast(nn.Linear, zeroed.get_submodule(p.output))
                output.weight[:, p.remove_groups(pruned, groups - 1)] = 0
        return _same_outputs(outputs(zeroed, example_input), outputs(pruned, example_input))
    except Exception:  # noqa: BLE001 - the model does not run with fewer heads: not offered
        return False


def _same_outputs(want: list[torch.Tensor], got: list[torch.Tensor]) -> bool:
    return len(want) == len(got) and all(
        w.shape == g.shape
        and torch.allclose(w, g, rtol=1e-3, atol=float(1e-5 * (1 + w.abs().max())))
        for w, g in zip(want, got, strict=True)
    )


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
            if isinstance(layer, nn.Linear)
            and (size := head_size(model, name)) is not None
            and not fused_projection(model, name)
        }
        if not heads:
            return set()
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
        return _same_outputs(outputs(zeroed, example_input), outputs(pruned, example_input))

    return accept


def _copy_with_inputs_zeroed(model: nn.Module, lost: dict[str, list[int]]) -> nn.Module:
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, idxs in lost.items():
            cast(torch.Tensor, zeroed.get_submodule(name).weight)[:, idxs] = 0
    return zeroed
