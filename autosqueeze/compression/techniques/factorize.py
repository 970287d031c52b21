"""Low-rank factorization by truncated SVD: one layer becomes two thinner ones.

A Linear (out x in) becomes Linear(in -> r) then Linear(r -> out) (Hugging Face's Conv1D, a
Linear stored transposed, likewise: GPT-2's projections); a Conv becomes a conv
with r output channels and the original kernel, then a 1x1 conv to the original outputs.
A grouped convolution is factorized group by group (its weight is block-diagonal): the
first conv has r outputs per group, the 1x1 conv keeps the groups. Only ranks with
r * (out + in_k) < out * in_k (per group) are offered: a larger rank adds parameters, and
a depthwise filter (one input per output) is rank 1 already.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn
from torch.nn.utils import skip_init

from autosqueeze.common.content_cache import ContentCache, content_key
from autosqueeze.compression.kernels import as_linear, is_conv1d
from autosqueeze.compression.techniques.base import CompressedModel, Site, Technique
from autosqueeze.plans.knobs import KnobValues, listed_numbers
from autosqueeze.plans.plan import LayerPlan

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
Factorizable = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d  # a Conv1D once ``as_linear``


def full_rank(layer: nn.Module) -> tuple[int, int]:
    """(outputs, inputs per output) of the layer's weight seen as a matrix, per group."""
    weight = cast(torch.Tensor, layer.weight)
    if is_conv1d(layer):  # stored (in, out)
        return weight.shape[1], weight.shape[0]
    return weight.shape[0] // _groups(layer), weight[0].numel()


def factor_shapes(layer: nn.Module, fraction: float) -> list[tuple[int, int]]:
    """The two factors' weights as the matrices the artifact stores: (rank per group x
    groups, inputs per output), then (outputs, rank per group)."""
    out, inp = full_rank(layer)
    r, groups = rank_for(layer, fraction), _groups(layer)
    return [(groups * r, inp), (groups * out, r)]


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def rank_for(layer: nn.Module, fraction: float) -> int:
    out, inp = full_rank(layer)
    return max(1, round(fraction * min(out, inp)))


def helps(layer: nn.Module, fraction: float) -> bool:
    out, inp = full_rank(layer)
    return rank_for(layer, fraction) * (out + inp) < out * inp


class Factorize(Technique):
    knob = "rank"
    harm_grows_with_strength = True
    listed = "fractions of the full rank"
    structural = True
    changes_speed = True

    def check_value(self, value: float) -> None:
        if not 0 < value <= 1:
            raise ValueError(f"rank is a fraction of the full rank in (0, 1], got {value}")

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        layer = site.layer
        if not _factorizable(layer):
            return None
        choices = listed_numbers(values)
        useful = sorted({c for c in choices if c < 1 and helps(layer, c)})
        if not useful:
            return None
        options = tuple(useful) + ((1.0,) if 1.0 in choices or 1 in choices else ())
        return CategoricalDistribution(options) if len(options) > 1 else options[0]

    def why_not(self, site: Site) -> str:
        if isinstance(site.layer, nn.modules.conv._ConvTransposeNd):
            return "a transposed convolution is not factorized"
        if not _factorizable(site.layer):
            return ""
        if isinstance(site.layer, _CONVS) and site.layer.in_channels == site.layer.groups:
            return "a depthwise filter is rank 1 already"
        return "no listed rank saves parameters here"

    def strength(self, value: Any) -> float:
        return 1.0 - float(value)  # the share of the rank dropped

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        layer = cast(Factorizable, as_linear(compressed.module.get_submodule(name)))
        r = rank_for(layer, layer_plan.rank)
        first, second = _factors(layer, r)
        matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        lefts, rights = [], []
        for block in matrix.chunk(_groups(layer)):  # the groups' own outputs
            u, s, vh = _svd(block)
            root = s[:r].sqrt()
            lefts.append(root[:, None] * vh[:r])
            rights.append(u[:, :r] * root)
        with torch.no_grad():
            first.weight.copy_(torch.cat(lefts).reshape(first.weight.shape))
            second.weight.copy_(torch.cat(rights).reshape(second.weight.shape))
            if layer.bias is not None and second.bias is not None:  # both or neither
                second.bias.copy_(layer.bias)
        compressed.module.set_submodule(name, nn.Sequential(first, second))

    def rebuild(self, model: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        layer = cast(Factorizable, as_linear(model.module.get_submodule(name)))
        model.module.set_submodule(
            name, nn.Sequential(*_factors(layer, rank_for(layer, layer_plan.rank)))
        )


_SVDS: ContentCache[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = ContentCache(
    1 << 30, lambda usv: sum(t.numel() * t.element_size() for t in usv)
)


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``matrix`` in float64, kept for the matrices seen last (up to 1 GiB).

    Most trials factorize layers of the unchanged base model, and the SVD is most of their
    compression time (1.4 s per BERT-base FFN matrix); keyed by the matrix's contents, a
    cached decomposition is the one computing it would give (compression runs on one thread).
    Always on the CPU: a probe on a GPU must not leave another device's decomposition in the
    cache for the artifact built next.
    """
    contiguous = matrix.cpu().contiguous()

    def decompose() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        found = torch.linalg.svd(contiguous.double(), full_matrices=False)
        return found.U, found.S, found.Vh

    return _SVDS.get(content_key(contiguous), decompose)


def _factorizable(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Linear, *_CONVS)) or is_conv1d(layer)


def _factors(layer: Factorizable, rank: int) -> tuple[Factorizable, Factorizable]:
    """The two layers, their weights left uninitialised: they are always overwritten (by the
    SVD, or by the artifact's weights), and random initialisation costs more than the SVD
    of a cached matrix."""
    bias = layer.bias is not None
    on = {"device": layer.weight.device, "dtype": layer.weight.dtype}  # a probe's: the GPU
    if isinstance(layer, nn.Linear):
        return (
            skip_init(nn.Linear, layer.in_features, rank, bias=False, **on),
            skip_init(nn.Linear, rank, layer.out_features, bias=bias, **on),
        )
    conv, groups = type(layer), layer.groups
    first = skip_init(
        conv,
        layer.in_channels,
        groups * rank,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=False,
        padding_mode=layer.padding_mode,
        **on,
    )
    second = skip_init(conv, groups * rank, layer.out_channels, 1, groups=groups, bias=bias, **on)
    return first, second
