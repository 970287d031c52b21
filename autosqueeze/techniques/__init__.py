"""Compression techniques, applied in a fixed order: factorize, prune, quantize.

The registry maps a plan knob to its technique; a new technique is one new module plus one
line here (and a field on LayerPlan).
"""

from __future__ import annotations

import copy

from torch import nn

from autosqueeze.plan import Plan
from autosqueeze.techniques.base import CompressedModel, Technique, weighted_parts
from autosqueeze.techniques.factorize import Factorize
from autosqueeze.techniques.prune import Prune
from autosqueeze.techniques.quantize import Quantize

TECHNIQUES: dict[str, Technique] = {t.knob: t for t in (Factorize(), Prune(), Quantize())}
"""knob -> technique, in the order they are applied."""


def technique_for(knob: str) -> Technique:
    if knob not in TECHNIQUES:
        raise ValueError(f"unknown knob {knob!r}; the knobs are {', '.join(TECHNIQUES)}")
    return TECHNIQUES[knob]


def compress(model: nn.Module, plan: Plan) -> CompressedModel:
    """Apply ``plan`` to a copy of ``model`` (the original is left as it was)."""
    _check_layers(model, plan)
    compressed = CompressedModel(copy.deepcopy(model).eval(), plan)
    for technique in TECHNIQUES.values():
        for name, layer_plan in plan.layers.items():
            if getattr(layer_plan, technique.knob) != technique.identity:
                technique.apply(compressed, name, layer_plan)
    return compressed


def rebuild(model: nn.Module, plan: Plan) -> nn.Module:
    """Give ``model`` (in place) the structure ``plan`` produces, so its weights can be loaded."""
    _check_layers(model, plan)
    for technique in TECHNIQUES.values():
        for name, layer_plan in plan.layers.items():
            if getattr(layer_plan, technique.knob) != technique.identity:
                technique.rebuild(model, name, layer_plan)
    return model


def _check_layers(model: nn.Module, plan: Plan) -> None:
    names = dict(model.named_modules())
    missing = [name for name in plan.layers if name not in names]
    if missing:
        raise ValueError(f"the plan names layers the model does not have: {missing}")


__all__ = [
    "TECHNIQUES",
    "CompressedModel",
    "Technique",
    "compress",
    "rebuild",
    "technique_for",
    "weighted_parts",
]
