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

import copy
import time
import weakref
from typing import Any

import torch
from optuna.distributions import BaseDistribution
from torch import nn

from autosqueeze.knobs import KnobValues, to_distribution
from autosqueeze.metrics import call_model
from autosqueeze.plan import LayerPlan
from autosqueeze.recovery import floating_tensors
from autosqueeze.techniques.base import CompressedModel, Site, Technique
from autosqueeze.time_limit import time_limit
from autosqueeze.user_code import describe

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PruneChannels(Technique):
    knob = "prune_channels"
    harm_grows_with_strength = True
    structural = True
    reaches_neighbours = True  # the coupled layers lose their matching inputs
    identity = 0.0
    changes_speed = True

    def check_value(self, value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"prune_channels is a fraction of outputs in [0, 1), got {value}")

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        layer = site.layer
        if not isinstance(layer, _PRUNABLE) or getattr(layer, "groups", 1) != 1:
            return None
        if site.target.example_input is None or site.name not in _prunable_layers(site):
            return None
        return to_distribution(values)

    def strength(self, value: Any) -> float:
        return float(value)  # the share of channels removed

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        graph, widths = _graph(compressed)
        layer = compressed.module.get_submodule(name)
        keep = max(1, widths[name] - round(layer_plan.prune_channels * widths[name]))
        surplus = _width(layer) - keep
        if surplus <= 0:
            return
        every = list(range(_width(layer)))
        scores = _importance()(graph.get_pruning_group(layer, _out_channels(layer), idxs=every))
        order = torch.argsort(scores, stable=True)[:surplus].tolist()
        graph.get_pruning_group(layer, _out_channels(layer), idxs=order).prune()

    def rebuild(self, model: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        self.apply(model, name, layer_plan)  # same counts; which channels does not matter here


def _width(layer: nn.Module) -> int:
    return int(layer.weight.shape[0])


def _out_channels(layer: nn.Module) -> Any:
    import torch_pruning as tp

    return (
        tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
    )


def _importance() -> Any:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="first")


def _build_graph(module: nn.Module, example_input: Any) -> Any:
    import torch_pruning as tp

    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            module,
            example_inputs=example_input,
            forward_fn=call_model,
            output_transform=floating_tensors,
            verbose=False,
        )


def _graph(compressed: CompressedModel) -> tuple[Any, dict[str, int]]:
    """The dependency graph of the model being compressed, and each layer's original width
    (recorded before the first structural change)."""
    if "dependency_graph" not in compressed.scratch:
        if compressed.target.example_input is None:
            raise ValueError("prune_channels needs the task's example input to trace the model")
        compressed.scratch["dependency_graph"] = (
            _build_graph(compressed.module, compressed.target.example_input),
            {
                n: _width(m)
                for n, m in compressed.module.named_modules()
                if isinstance(m, _PRUNABLE)
            },
        )
    return compressed.scratch["dependency_graph"]


_PRUNABLE_CACHE: weakref.WeakKeyDictionary[nn.Module, set[str] | str] = weakref.WeakKeyDictionary()


def _prunable_layers(site: Site) -> set[str]:
    """Layers of the model whose output channels can go without changing what the model
    outputs: found once per model from its dependency graph. Torch-Pruning failing to trace
    the model (it raises on some, e.g. a channel shuffle) is remembered too, and raised for
    every layer, so the space withholds the knob and says why."""
    if site.model not in _PRUNABLE_CACHE:
        try:
            found: set[str] | str = _find_prunable(site.model, site.target.example_input)
        except Exception as exc:  # noqa: BLE001 - a third-party graph analysis
            found = f"Torch-Pruning cannot trace the model: {describe(exc)}"
        _PRUNABLE_CACHE[site.model] = found
    found = _PRUNABLE_CACHE[site.model]
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


ANALYSIS_LIMIT_S = 120.0  # Torch-Pruning on one model (on a tiny LLaMA it ran past 5 minutes)
LAYER_LIMIT_S = 20.0  # ... and on one of its layers


def _find_prunable(model: nn.Module, example_input: Any) -> set[str]:
    """The layers from which one channel can be removed, on a copy, with the model still
    running and every output keeping its shape. That rules out a classifier's logits, a
    transformer's hidden size (coupled to its outputs) and attention projections whose width
    must stay a multiple of the head count. A layer whose analysis raises or runs past
    ``LAYER_LIMIT_S`` is not prunable; past ``ANALYSIS_LIMIT_S`` in all, no more are tried."""
    deadline = time.monotonic() + ANALYSIS_LIMIT_S
    with torch.inference_mode():
        shapes = [t.shape for t in floating_tensors(call_model(model, example_input))]
    with time_limit(ANALYSIS_LIMIT_S):
        graph = _build_graph(model, example_input)
    candidates = [
        name
        for name, layer in model.named_modules()
        if isinstance(layer, _PRUNABLE) and layer in graph.module2node and _width(layer) > 1
    ]
    verdicts: dict[frozenset[int], bool] = {}  # layers coupled in one group share a verdict
    prunable = set()
    for name in candidates:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        layer = model.get_submodule(name)
        try:
            with time_limit(min(LAYER_LIMIT_S, left)):
                group = graph.get_pruning_group(layer, _out_channels(layer), idxs=[0])
                key = frozenset(id(dep.target.module) for dep, _ in group)
                if key not in verdicts:
                    verdicts[key] = _prunes_cleanly(model, name, example_input, shapes)
        except Exception:  # noqa: BLE001 - Torch-Pruning cannot group this layer: not prunable
            continue
        if verdicts[key]:
            prunable.add(name)
    return prunable


def _prunes_cleanly(model: nn.Module, name: str, example_input: Any, shapes: list[Any]) -> bool:
    trial = copy.deepcopy(model)
    layer = trial.get_submodule(name)
    try:
        _build_graph(trial, example_input).get_pruning_group(
            layer, _out_channels(layer), idxs=[0]
        ).prune()
        with torch.inference_mode():
            got = [t.shape for t in floating_tensors(call_model(trial, example_input))]
    except Exception:  # noqa: BLE001 - any failure means: not prunable on its own
        return False
    return got == shapes
