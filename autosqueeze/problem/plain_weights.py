"""Weights as tensors: a model's parametrized weights folded into plain parameters.

A layer whose weight is computed from other parameters on every call (weight norm on a
speech encoder's positional convolution, spectral norm, any ``torch.nn.utils.parametrize``
parametrization, or the older hook-based ``weight_norm``) holds no ``weight`` of its own to
store, prune or quantize. For inference the computed weight is the layer's weight, so the
model is compressed, judged and shipped with it folded in: the same function, one tensor.
"""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def fold_parametrizations(model: nn.Module) -> nn.Module:
    """``model`` with every parametrized tensor replaced by the tensor it computes now."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(cast(nn.ModuleDict, module.parametrizations)):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                remove_weight_norm(module, hook.name)
            elif isinstance(hook, SpectralNorm):
                remove_spectral_norm(module, hook.name)
    return model
