"""Compression techniques, applied in a fixed order: structured pruning (channels, heads),
factorization, depthwise separation, unstructured pruning, quantization, weight sharing
(which replaces a layer's quantization); and at load time the execution form (kernel).

The registry maps a plan knob to its technique. A technique in the package is one new module
plus its line in ``knob_facts.KNOBS``, which names the class; one from outside the package is
one module whose class carries ``@register`` (docs/extending.md).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from autosqueeze.compression.codecs import decode, encode
from autosqueeze.compression.recovery import Recovery
from autosqueeze.compression.techniques.base import (
    CompressedModel,
    Rounded,
    Site,
    Target,
    Technique,
    weighted_parts,
)
from autosqueeze.plans import knob_facts
from autosqueeze.plans.knob_facts import DEFAULTS, KNOBS, SETTINGS, Knob
from autosqueeze.plans.plan import LayerPlan, Plan

TECHNIQUES = cast("dict[str, Technique]", knob_facts.TECHNIQUES)
"""knob -> technique, in the order they apply: the registry the plan reads (``knob_facts``),
which this package fills, typed as what it holds for the stages above."""


def _technique(knob: Knob) -> Technique:
    """The technique a ``Knob`` line names, from its module in this package."""
    module, _, name = knob.technique.partition(":")
    technique: Technique = getattr(importlib.import_module(f"{__name__}.{module}"), name)()
    if technique.knob != knob.name:
        raise RuntimeError(f"{knob.technique} reads the knob {technique.knob!r}, not {knob.name!r}")
    return technique


TECHNIQUES.update((name, _technique(knob)) for name, knob in KNOBS.items())


def register(technique: type[Technique] | None = None, *, before: str = "bits") -> Any:
    """Class decorator: add a technique to ``TECHNIQUES``, applied just before the knob
    ``before`` (by default before quantization, which stores what the others left). Its knob
    is then a plan value (``LayerPlan.extra``), a space-file knob and a column of the
    reports, in this process and, since evaluators import the config's modules, in theirs.
    ``@register`` or ``@register(before="kernel")``."""

    def add(cls: type[Technique]) -> type[Technique]:
        instance = cls()
        if instance.knob in DEFAULTS:
            raise ValueError(f"technique {cls.__name__}: {instance.knob!r} is a built-in knob")
        if before not in TECHNIQUES:
            raise ValueError(f"register(before={before!r}): the knobs are {', '.join(TECHNIQUES)}")
        order = [(k, t) for k, t in TECHNIQUES.items() if k != instance.knob]
        at = next(i for i, (k, _) in enumerate(order) if k == before)
        order.insert(at, (instance.knob, instance))
        TECHNIQUES.clear()
        TECHNIQUES.update(order)
        return cls

    return add if technique is None else add(technique)


def technique_for(knob: str) -> Technique:
    if knob not in TECHNIQUES:
        raise ValueError(f"unknown knob {knob!r}; the knobs are {', '.join(TECHNIQUES)}")
    return TECHNIQUES[knob]


def changes(layer_plan: LayerPlan) -> bool:
    """Whether ``layer_plan`` changes its layer at all (a knob off its identity)."""
    return any(getattr(layer_plan, t.knob) != t.identity for t in TECHNIQUES.values())


def runs_differently(layer_plan: LayerPlan) -> bool:
    """Whether ``layer_plan`` changes how its layer runs (its kernel or shapes), not only
    what it stores: the sensitivity pass times such layers."""
    return any(
        t.changes_speed and getattr(layer_plan, t.knob) != t.identity for t in TECHNIQUES.values()
    )


def compress(
    model: nn.Module,
    plan: Plan,
    target: Target | None = None,
    recovery: Recovery | None = None,
) -> CompressedModel:
    """Apply ``plan`` to a copy of ``model`` (the original is left as it was). With
    ``recovery``, the copy is distilled from ``model`` once the structural steps are done;
    with ``recovery.on_grid``, once every step is done, each weight trained on the grid it
    is stored on.

    It runs on one thread whatever the caller uses: a multi-threaded reduction sums in an
    order that depends on the thread count, and over hundreds of recovery steps that changes
    the weights. A Ray evaluator (one thread) and the driver (all of them) must build the same
    artifact from a plan, or the front's rebuilt files would not be the ones measured.
    """
    _check_layers(model, plan)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compressed = CompressedModel(copy.deepcopy(model).eval(), plan, target or Target())
        steps = _steps(plan, model)
        last_structural = max((i for i, s in enumerate(steps) if s[0].structural), default=None)
        for i, (technique, name, layer_plan) in enumerate(steps):
            technique.apply(compressed, name, layer_plan)
            if recovery and not recovery.on_grid and i == last_structural:
                recovery.run(compressed.module, model)
        if recovery and recovery.on_grid and plan.layers:
            recovery.run(compressed.module, model, compressed.codecs)
    finally:
        torch.set_num_threads(previous)
    return compressed


@contextlib.contextmanager
def applied(model: nn.Module, plan: Plan, target: Target | None = None) -> Iterator[nn.Module]:
    """``model`` itself with ``plan`` applied to its layers and run in their execution form, as
    the plan's artifact would load (weights through their codecs' round trip); put back as it
    was on exit. A sensitivity probe changes one layer of a large model: copying the layer,
    not the model, is what makes hundreds of them cheap. Plans that reach beyond their
    layers (channel pruning reshapes the coupled ones) are built as a compressed copy
    instead. Either way there is no recovery training."""
    if any(technique.reaches_neighbours for technique, _, _ in _steps(plan, model)):
        compressed = compress(model, plan, target)
        yield _round_trip(compressed).module
        return
    originals = {name: model.get_submodule(name) for name in plan.layers}
    saved = {name: _tensors_of(layer) for name, layer in originals.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as compress does: the same weights whatever the caller uses
    try:
        compressed = CompressedModel(model, plan, target or Target())
        for technique, name, layer_plan in _steps(plan, model):
            technique.apply(compressed, name, layer_plan)
        torch.set_num_threads(previous)
        yield _round_trip(compressed).module
    finally:
        torch.set_num_threads(previous)
        for name, layer in originals.items():
            model.set_submodule(name, layer)
            _restore(layer, saved[name])


def _tensors_of(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {key: t.detach().clone() for key, t in layer.state_dict(keep_vars=True).items()}


def _restore(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put a layer's saved tensors back into the very parameter objects it holds (a deep copy
    would untie a weight the layer shares with another: an embedding and its output head)."""
    with torch.no_grad():
        for key, tensor in tensors.items():
            owner, _, leaf = key.rpartition(".")
            module = layer.get_submodule(owner)
            param = module._parameters.get(leaf)  # the parameter object, not a copy
            if param is not None:
                param.data = tensor
            else:
                module._buffers[leaf] = tensor


def _round_trip(compressed: CompressedModel) -> CompressedModel:
    """Weights replaced by what their codecs store, then layers in their execution form. A
    weight whose integers a rounding chose holds what they decode to already."""
    module = compressed.module
    with torch.no_grad():
        for key, codec in compressed.codecs.items():
            weight = module.get_parameter(key)
            if compressed.chosen(key, weight, codec) is not None:
                continue
            stored = encode(weight, codec)
            weight.copy_(decode(stored.parts, stored.meta))
    deploy(module.eval(), compressed.plan)
    return compressed


def rebuild(model: nn.Module, plan: Plan, target: Target | None = None) -> nn.Module:
    """Give ``model`` (in place) the structure ``plan`` produces, so its weights can be loaded."""
    _check_layers(model, plan)
    work = CompressedModel(model, plan, target or Target())
    for technique, name, layer_plan in _steps(plan, model):
        technique.rebuild(work, name, layer_plan)
    return model


def deploy(model: nn.Module, plan: Plan) -> nn.Module:
    """Turn a loaded model (in place, already on its device) into its execution form."""
    steps = _steps(plan, model)  # positions before any layer is replaced
    for technique, name, layer_plan in steps:
        technique.deploy(model, name, layer_plan)
    return model


def _steps(plan: Plan, model: nn.Module) -> list[tuple[Technique, str, LayerPlan]]:
    """(technique, layer, choices) for every knob a plan changes, in application order:
    technique by technique, layers in the model's order. The order must not depend on how
    the plan's dict happens to be ordered: removing channels from one layer of a coupled group
    before another changes which channels go, and a plan read back from JSON (sorted by name)
    must give the artifact the search measured."""
    _check_knobs(plan)
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = sorted(plan.layers.items(), key=lambda item: position[item[0]])
    return [
        (technique, name, layer_plan)
        for technique in TECHNIQUES.values()
        for name, layer_plan in layers
        if getattr(layer_plan, technique.knob) != technique.identity
    ]


def check_plan(plan: Plan) -> None:
    """Raise ValueError for a choice no technique can take (a plan read from an artifact is
    untrusted: bits 1, a negative prune, an unknown kernel, knob or pruning criterion)."""
    _check_knobs(plan)
    for name, layer_plan in plan.layers.items():
        for technique in TECHNIQUES.values():
            try:
                technique.validate(getattr(layer_plan, technique.knob))
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None
        for setting in SETTINGS.values():
            try:
                setting.check(getattr(layer_plan, setting.name))
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from None


def _check_knobs(plan: Plan) -> None:
    """A knob no registered technique has would be silently left out of the model."""
    for name, layer_plan in plan.layers.items():
        unknown = sorted(set(layer_plan.extra) - set(TECHNIQUES))
        if unknown:
            raise ValueError(
                f"layer {name!r}: no technique has the knob {unknown[0]!r}; the knobs are "
                f"{', '.join(TECHNIQUES)} (a technique registered outside autosqueeze is known "
                "once its module is imported: the config's model module, when it holds it)"
            )


def _check_layers(model: nn.Module, plan: Plan) -> None:
    names = dict(model.named_modules())
    missing = [name for name in plan.layers if name not in names]
    if missing:
        raise ValueError(f"the plan names layers the model does not have: {missing}")


__all__ = [
    "TECHNIQUES",
    "CompressedModel",
    "Rounded",
    "Site",
    "Target",
    "Technique",
    "applied",
    "check_plan",
    "compress",
    "deploy",
    "register",
    "runs_differently",
    "rebuild",
    "technique_for",
    "weighted_parts",
]
