"""Depthwise-separable convolution (MobileNet's): a k x k convolution over all its input
channels becomes a depthwise one (each input channel filtered alone, by ``m`` filters of
its own: the depth multiplier) then a 1 x 1 pointwise one that mixes them.

It is initialised by a low-rank fit. For each input channel c, the original's filters of
that channel, ``W[:, c]`` (outputs x k x k), are one matrix; its best rank-m approximation
``U S V^T`` gives the channel's m depthwise filters (``sqrt(S) V^T``) and their pointwise
weights (``U sqrt(S)``). The fit is exact where each of those matrices has rank m or less;
elsewhere recovery training (``task.calibration``) wins back the rest, as after
factorization (on the residual CNN, m = 1 on every 3x3 conv: accuracy 0.16 as fitted, 0.993
after 300 steps, against the original's 0.994).

Parameters: ``in * m * k + in * m * out`` against ``out * in * k``; only multipliers that
save parameters, and at most ``min(out, k)`` (past it the fit is exact already), are
offered. A factorized layer (``rank``) is made separable in its k x k half. Whether it is
faster depends on the device and the batch: on this project's CPU the residual CNN made
separable ran 2.1x faster than the original at batch 64 and 1.3x slower at batch 1, where
each extra layer's overhead outweighs the arithmetic saved; trials measure it.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn
from torch.nn.utils import skip_init

from autosqueeze.compression.techniques.base import CompressedModel, Site, Technique, weighted_parts
from autosqueeze.plans.knobs import KnobValues, listed_numbers
from autosqueeze.plans.plan import LayerPlan

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
MAX_MULTIPLIER = 64


class Separable(Technique):
    knob = "separable"
    structural = True
    changes_speed = True
    harm_grows_with_strength = True
    listed = "depth multipliers (0 = off)"

    def check_value(self, value: float) -> None:
        if value != int(value) or not 0 <= value <= MAX_MULTIPLIER:
            raise ValueError(
                f"separable is a depth multiplier, a whole number in 0-{MAX_MULTIPLIER} "
                f"(0 = off), got {value}"
            )

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        if not _separable(site.layer):
            return None
        choices = [int(v) for v in listed_numbers(values)]
        useful = sorted({m for m in choices if m and _helps(site.layer, m)})
        if not useful:
            return None
        options = ((0,) if 0 in choices else ()) + tuple(useful)
        return CategoricalDistribution(options) if len(options) > 1 else options[0]

    def why_not(self, site: Site) -> str:
        layer = site.layer
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            return "a transposed convolution is not made separable"
        if not isinstance(layer, _CONVS):
            return ""
        if layer.groups != 1:
            return "a grouped or depthwise convolution is separated already"
        if layer.in_channels == 1:
            return "with one input channel, separation is factorization (rank)"
        if _taps(layer) == 1:
            return "a 1x1 convolution has no spatial filter to separate"
        return "no listed depth multiplier saves parameters here"

    def strength(self, value: Any) -> float:
        return 1.0 / int(value) if value else 0.0  # one depthwise filter per channel: most

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        part_name, conv = _spatial_part(compressed.module, name)
        m = _multiplier(conv, int(layer_plan.separable))
        depthwise, pointwise = _halves(conv, m)
        weight = conv.weight.detach()
        out, inputs = weight.shape[:2]
        filters, mixes = [], []
        for c in range(inputs):  # the channel's filters, outputs x taps, fitted at rank m
            u, s, vh = torch.linalg.svd(weight[:, c].reshape(out, -1).double(), full_matrices=False)
            root = s[:m].sqrt()
            filters.append(root[:, None] * vh[:m])
            mixes.append(u[:, :m] * root)
        with torch.no_grad():
            depthwise.weight.copy_(torch.cat(filters).reshape(depthwise.weight.shape))
            pointwise.weight.copy_(torch.cat(mixes, dim=1).reshape(pointwise.weight.shape))
            if conv.bias is not None and pointwise.bias is not None:  # both or neither
                pointwise.bias.copy_(conv.bias)
        compressed.module.set_submodule(part_name, nn.Sequential(depthwise, pointwise))

    def rebuild(self, model: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        part_name, conv = _spatial_part(model.module, name)
        halves = _halves(conv, _multiplier(conv, int(layer_plan.separable)))
        model.module.set_submodule(part_name, nn.Sequential(*halves))


def _separable(layer: nn.Module) -> TypeGuard[Conv]:
    return (
        isinstance(layer, _CONVS)
        and layer.groups == 1
        and _taps(layer) > 1
        and layer.in_channels > 1  # one input: separation is a rank-m factorization (rank)
    )


def _taps(conv: Conv) -> int:
    return math.prod(conv.kernel_size)


def _helps(conv: Conv, m: int) -> bool:
    inputs, out, taps = conv.in_channels, conv.out_channels, _taps(conv)
    return m <= min(out, taps) and inputs * m * (taps + out) < out * inputs * taps


def _multiplier(conv: Conv, m: int) -> int:
    """``m``, or the rank past which the fit is exact (a factorized layer's k x k half has
    fewer outputs than the layer the multiplier was offered on)."""
    return max(1, min(m, conv.out_channels, _taps(conv)))


def _spatial_part(module: nn.Module, name: str) -> tuple[str, Conv]:
    """The k x k convolution of layer ``name``: the layer itself, or a factorized layer's
    first half."""
    for part_name, part in weighted_parts(module, name):
        if _separable(part):
            return part_name, part
    raise ValueError(f"layer {name!r} has no k x k convolution over all its inputs to separate")


def _halves(conv: Conv, m: int) -> tuple[Conv, Conv]:
    """The depthwise and pointwise convolutions, their weights left uninitialised (the fit,
    or the artifact's weights, overwrite them)."""
    kind, inputs = type(conv), conv.in_channels
    on = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    depthwise = skip_init(
        kind,
        inputs,
        inputs * m,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=inputs,
        bias=False,
        padding_mode=conv.padding_mode,
        **on,
    )
    pointwise = skip_init(kind, inputs * m, conv.out_channels, 1, bias=conv.bias is not None, **on)
    return depthwise, pointwise
