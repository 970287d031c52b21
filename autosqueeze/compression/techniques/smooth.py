"""Activation smoothing (SmoothQuant, Xiao et al. 2023): a Linear's input channels divided by
factors its weight's columns are multiplied by, so the layer computes what it did while its
input's few outlier channels shrink and int8 activations (one scale per tensor: the
``int8_dynamic`` and ``ort_int8_dynamic`` kernels) keep more of the rest.

Per input channel j, with the migration strength alpha (the knob): s_j = max|X_j|^alpha /
max|W_:,j|^(1 - alpha), max|X_j| over the calibration batches (else the example input). Layers
that read the same input tensor and are smoothed with the same alpha (an attention's query,
key and value) share one set of factors, max|W_:,j| then the largest over their weights, as
SmoothQuant does: the ONNX file then scales their input once (``onnx_forms.merge_scalings``),
and ONNX Runtime quantizes it once for the three, not once per layer. Each factor is rounded
to a power of two, so dividing and multiplying by it are exact in any float format: the
smoothed layer computes bit for bit what the original did (but for an exponent pushed under
the smallest normal number), and its factors are stored as one int8 exponent per input
channel. 0 is off, not the formula's alpha 0 (which would move every weight's range
into the activations).

The factors cannot always be folded into what feeds the layer: in a post-norm encoder (BERT,
MiniLM) the norm's output also feeds the residual. So the layer becomes ``InputScale`` then
the layer (a Hugging Face ``Conv1D`` as the Linear it is), and the kernel runs the Linear.
Applied after the structural steps and unstructured pruning (a zero stays zero), before
quantization and weight sharing, which then store the smoothed weight.
"""

from __future__ import annotations

from typing import Any

import torch
from optuna.distributions import BaseDistribution
from torch import nn

from autosqueeze.compression.kernels import as_linear, is_conv1d
from autosqueeze.compression.techniques.base import CompressedModel, Site, Technique
from autosqueeze.compression.techniques.calibration import over_calibration
from autosqueeze.plans.knobs import KnobValues, to_distribution
from autosqueeze.plans.plan import LayerPlan

SHIFT_LIMIT = 20
"""The largest |log2 s| kept: 2^20 is far past any factor a real layer needs, and a stored
exponent beyond it is refused when loading (a file is untrusted)."""


class InputScale(nn.Module):
    """Multiplies its input, channel by channel (the last dimension), by 2^-shift: the
    smoothing factors' inverses, held as int8 exponents (what the artifact stores: a byte per
    channel) and as the float factors computed from them (not stored)."""

    factor: torch.Tensor
    shift: torch.Tensor

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.to(torch.int8))
        self.register_buffer("factor", _factors(self.shift), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        """The stored exponents, checked, and the factors made from them."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        error_msgs = args[-1]
        if bool((self.shift.int().abs() > SHIFT_LIMIT).any()):  # int: |-128| overflows int8
            error_msgs.append(f"{prefix}shift: an exponent past +-{SHIFT_LIMIT}")
        self.factor = _factors(self.shift)


def _factors(shift: torch.Tensor) -> torch.Tensor:
    return torch.exp2(-shift.float())


class Smooth(Technique):
    knob = "smooth"
    calibrated = True  # its ranges from one example sentence cost MiniLM fidelity
    # keeps_layer stays False: the layer becomes InputScale then the layer, and its weight's
    # columns change, so a tied weight (or a layer its parent reads) is not offered it

    def check_value(self, value: float) -> None:
        if not 0 <= value <= 1:
            raise ValueError(f"smooth is a migration strength in [0, 1] (0: off), got {value}")

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        return to_distribution(values) if _smoothable(site.layer) else None

    def why_not(self, site: Site) -> str:
        return "" if _smoothable(site.layer) else "smoothing scales a Linear's input features"

    def strength(self, value: Any) -> float:
        return 0.0  # it stores the same bytes: what it changes is how int8 activations fare

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        layer = as_linear(compressed.module.get_submodule(name))
        first = _first_linear(layer)
        weight = first.weight.detach()
        shift = _shifts(compressed, name).to(weight.device, copy=True)  # shared: not tied
        with torch.no_grad():
            first.weight.mul_(torch.exp2(shift.float()).to(weight.dtype))
        compressed.module.set_submodule(name, nn.Sequential(InputScale(shift), layer))

    def rebuild(self, model: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        layer = as_linear(model.module.get_submodule(name))
        first = _first_linear(layer)
        zeros = torch.zeros(first.in_features, dtype=torch.int8, device=first.weight.device)
        model.module.set_submodule(name, nn.Sequential(InputScale(zeros), layer))


def smoothing_shifts(
    input_range: torch.Tensor, weight_range: torch.Tensor, alpha: float
) -> torch.Tensor:
    """log2 of each input channel's factor s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha),
    rounded to a whole exponent (int8); 0 where the channel or its weights are all zero."""
    live = (input_range > 0) & (weight_range > 0)
    exponent = alpha * input_range.clamp_min(1e-30).log2()
    exponent -= (1 - alpha) * weight_range.clamp_min(1e-30).log2()
    exponent = exponent.round().clamp(-SHIFT_LIMIT, SHIFT_LIMIT)
    return torch.where(live, exponent, torch.zeros_like(exponent)).to(torch.int8)


def _smoothable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


def _first_linear(layer: nn.Module) -> nn.Linear:
    """The Linear that reads the layer's input: the layer, or its first factor (``rank``)."""
    return next(m for m in layer.modules() if isinstance(m, nn.Linear))


def _shifts(compressed: CompressedModel, name: str) -> torch.Tensor:
    """Layer ``name``'s exponents: shared with every layer that reads the same input tensor
    and is smoothed with the same alpha (an attention's query, key and value), the weight
    range each channel is balanced against being the largest over the group's weights, as
    SmoothQuant does for query, key and value. Computed for the whole group when the first of
    it is smoothed (the others' weights still as they were), kept for the rest."""
    found: dict[str, torch.Tensor] = compressed.scratch.setdefault("smoothing_shifts", {})
    if name not in found:
        ranges, readers = _input_ranges(compressed)
        layers = compressed.plan.layers
        alpha = float(layers[name].smooth)
        group = [name]
        if name in readers:
            group = [
                n for n in readers if readers[n] == readers[name] and layers[n].smooth == alpha
            ]
        weight_range = torch.stack([_weight_range(compressed, n) for n in group]).amax(0)
        input_range = torch.stack([ranges[n] for n in group]).amax(0)
        shift = smoothing_shifts(input_range.to(weight_range.device), weight_range, alpha)
        found.update(dict.fromkeys(group, shift))
    return found[name]


def _weight_range(compressed: CompressedModel, name: str) -> torch.Tensor:
    """max |W_:,j| per input channel of layer ``name``'s first Linear, in float32."""
    layer = _first_linear(as_linear(compressed.module.get_submodule(name)))
    return layer.weight.detach().abs().amax(0).float()


def _input_ranges(
    compressed: CompressedModel,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """max |x_j| per input channel of every layer the plan smooths, over the calibration
    batches, and which of them read one input tensor (``over_calibration``'s ``readers``):
    taken in one pass, before any of them is smoothed, and kept for the rest of this
    compression (smoothing one layer leaves every layer's inputs as they were)."""
    if "input_ranges" not in compressed.scratch:
        names = {n for n, lp in compressed.plan.layers.items() if lp.smooth}

        def largest(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return x.abs().reshape(-1, x.shape[-1]).amax(0)

        readers: dict[str, str] = {}
        found = over_calibration(
            compressed, names, largest, "smooth", torch.maximum, readers=readers
        )
        compressed.scratch["input_ranges"] = found, readers
    ranges: tuple[dict[str, torch.Tensor], dict[str, str]] = compressed.scratch["input_ranges"]
    return ranges
