"""Unstructured pruning: a fraction of a layer's weights become 0, chosen by a criterion.

``prune_by: magnitude`` (the default) zeroes the smallest |w|. ``prune_by: activation`` zeroes
the smallest |w| x ||x||, where ||x|| is the norm of the input feature the weight multiplies
over the calibration batches (Wanda, Sun et al. 2023). It compares weights within each output
row, so every row loses the same share. A weight on a quiet input goes before a larger one on
a loud input. ``prune_by: hessian`` is SparseGPT (Frantar & Alistarh 2023), Optimal Brain
Surgeon made cheap: with H = X^T X of a Linear's inputs, it goes through the columns in
blocks of 128, zeroes in each block the weights of least w^2 / [H^-1]_jj^2 and moves each
zeroed weight's error onto the columns not yet visited, so the layer's outputs on the
calibration inputs change least; where GPTQ also rounds the layer, it prunes in GPTQ's sweep
instead (SparseGPT's joint form, ``quantize``). Convolutions take the activation criterion
instead. The
statistics are taken once per compression, on the model as it is when pruning starts, from
``task.calibration`` (else the example input). ``prune_by: "2:4"`` (with ``prune: 0.5``)
zeroes the smaller 2 of every 4 consecutive weights of a row: the semi-structured pattern
NVIDIA's sparse tensor cores run (the ``sparse24`` kernel, on CUDA).

Zeros alone save nothing; the artifact stores a weight as a bitmap plus its nonzeros when
that is smaller than dense storage, which is where pruning's bytes are won.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from torch import nn

from autosqueeze.compression.kernels import is_conv1d
from autosqueeze.compression.rounding import inverse_hessian, least_salient, prunes_as_it_rounds
from autosqueeze.compression.techniques.base import (
    CompressedModel,
    Technique,
    matrices,
    weighted_parts,
)
from autosqueeze.compression.techniques.calibration import input_hessians, over_calibration
from autosqueeze.plans.knob_facts import PRUNE_BY
from autosqueeze.plans.plan import LayerPlan

CRITERIA = PRUNE_BY.choices  # a space rule's prune_by


def prune_by_magnitude(weight: torch.Tensor, ratio: float) -> None:
    """Zero ``round(ratio * n)`` smallest-|w| entries in place (ties broken by position).

    A selection, not a sort: the count-th smallest magnitude is found in linear time (NumPy's
    introselect: 6 ms for a BERT-base FFN matrix, against 300 ms for a sort and 57 ms for
    ``torch.kthvalue``), then everything below it and, in index order, as many entries equal
    to it as the count needs: a stable sort's first ``count``."""
    count = round(ratio * weight.numel())
    if not count:
        return
    magnitude = weight.detach().abs().flatten()
    if magnitude.dtype == torch.bfloat16:  # NumPy has no bfloat16
        magnitude = magnitude.float()
    threshold = float(np.partition(magnitude.cpu().numpy(), count - 1)[count - 1])
    chosen = magnitude < threshold
    ties = torch.nonzero(magnitude == threshold).flatten()
    chosen[ties[: count - int(torch.count_nonzero(chosen))]] = True
    with torch.no_grad():
        weight.view(-1)[chosen] = 0


class Prune(Technique):
    knob = "prune"
    harm_grows_with_strength = True
    keeps_layer = True

    def check_value(self, value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"prune is a fraction of weights in [0, 1), got {value}")

    def strength(self, value: Any) -> float:
        return float(value)  # the share of weights zeroed

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        PRUNE_BY.check(layer_plan.prune_by)
        criterion = layer_plan.prune_by if layer_plan.prune > 0 else "magnitude"
        if criterion == TWO_OF_FOUR and layer_plan.prune != 0.5:
            raise ValueError(
                f"layer {name!r}: prune_by 2:4 zeroes 2 of every 4 weights, so its prune is "
                f"0.5, not {layer_plan.prune}"
            )
        parts = weighted_parts(compressed.module, name)
        by_gptq = {n for n, p in parts if prunes_as_it_rounds(layer_plan, p)}  # quantize's
        linear = {n for n, p in parts if isinstance(p, nn.Linear) or is_conv1d(p)} - by_gptq
        hessians = (
            input_hessians(compressed, linear, _hessian_layers(compressed), _WHY)
            if criterion == "hessian"
            else {}
        )
        rest = {n for n, _ in parts} - linear - by_gptq  # convolutions: by activation
        by_norms = criterion == "activation" or (criterion == "hessian" and bool(rest))
        norms = _input_norms(compressed) if by_norms else {}
        for part_name, part in parts:
            for key, matrix in matrices(part).items():
                if criterion == TWO_OF_FOUR:
                    prune_two_of_four(matrix.t() if is_conv1d(part) else matrix)
                elif key == "weight" and part_name in by_gptq:
                    continue  # GPTQ prunes it as it rounds (quantize.py)
                elif key == "weight" and part_name in hessians:
                    prune_by_hessian(part, hessians[part_name], layer_plan.prune)
                elif key == "weight" and part_name in norms:
                    prune_by_activation(part, norms[part_name], layer_plan.prune)
                else:  # an embedding, or attention's in_proj_weight: no input features
                    prune_by_magnitude(matrix, layer_plan.prune)


TWO_OF_FOUR = "2:4"


def prune_two_of_four(weight: torch.Tensor) -> None:
    """Zero the 2 smallest |w| of every 4 consecutive weights along each output row's inputs
    (ties broken by position), in place: NVIDIA's semi-structured pattern, which the
    ``sparse24`` kernel runs on sparse tensor cores. Half the weights go, as with
    ``prune: 0.5`` by magnitude, but a row may not keep its 3 largest of 4 where they sit
    together: the price of the pattern a kernel can use."""
    rows = weight.shape[0]
    flat = weight.detach().reshape(rows, -1)
    if flat.shape[1] % 4:
        raise ValueError(f"2:4 pruning takes a row's weights 4 by 4; its {flat.shape[1]} do not")
    groups = flat.abs().reshape(rows, -1, 4)
    smallest = groups.argsort(dim=-1, stable=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, smallest, True)
    with torch.no_grad():
        weight.copy_(flat.masked_fill(mask.reshape(rows, -1), 0).reshape(weight.shape))


BLOCK = 128
"""Columns SparseGPT chooses a mask for at once (the paper's adaptive mask selection)."""


def prune_by_hessian(layer: nn.Module, hessian: torch.Tensor, ratio: float) -> None:
    """SparseGPT on a Linear (or Conv1D): zero ``round(ratio * n)`` of its weights, block of
    columns by block, those of least w^2 / [H^-1]_jj^2, and update the columns to their right
    by each zeroed weight's error times H^-1's row, so X W^T changes least."""
    weight = cast(torch.Tensor, layer.weight)
    stored = weight.t() if is_conv1d(layer) else weight  # (out, in)
    w = stored.detach().double().clone()
    rows, cols = w.shape
    total = round(ratio * w.numel())
    if not total:
        return
    inverse = inverse_hessian(hessian, w)  # GPTQ's, damped alike
    done = 0
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        block, hinv = w[:, start:end].clone(), inverse[start:end, start:end]
        errors = torch.zeros_like(block)
        count = round(total * end / cols) - done  # spread evenly, exactly total in all
        done += count
        mask = least_salient(block, hinv, count)
        for i in range(end - start):
            column = block[:, i]
            kept = torch.where(mask[:, i], torch.zeros_like(column), column)
            error = (column - kept) / hinv[i, i]
            block[:, i:] -= error[:, None] * hinv[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ inverse[start:end, end:]
    with torch.no_grad():
        stored.copy_(w.to(weight.dtype))


def prune_by_activation(layer: nn.Module, norms: torch.Tensor, ratio: float) -> None:
    """Zero, in each output row of ``layer.weight``, the ``round(ratio * row)`` entries of
    smallest |w| x norm of their input feature (ties broken by position)."""
    weight = cast(torch.Tensor, layer.weight)
    rows = weight.t() if is_conv1d(layer) else weight  # Conv1D stores (in, out)
    count = round(ratio * rows[0].numel())
    if not count:
        return
    score = rows.detach().abs().float() * _per_weight(layer, norms.to(weight.device))
    order = torch.argsort(score.reshape(rows.shape[0], -1), dim=1, stable=True)[:, :count]
    with torch.no_grad():
        flat = rows.reshape(rows.shape[0], -1) if rows.is_contiguous() else None
        if flat is not None:
            flat.scatter_(1, order, 0.0)
        else:  # Conv1D's transposed view: zero through a mask on the stored weight
            mask = torch.ones_like(score.reshape(rows.shape[0], -1))
            mask.scatter_(1, order, 0.0)
            weight.mul_(mask.reshape(rows.shape).t().to(weight.dtype))


def _per_weight(layer: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """The input norm of each weight of ``layer`` in (out, in, *kernel) order: a Linear's
    column, a convolution's input channel within its group."""
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        return norms[None, :]
    conv = cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", layer)
    out_channels, per_group = conv.weight.shape[:2]
    group = torch.arange(out_channels, device=norms.device) // (out_channels // conv.groups)
    by_row = norms.reshape(conv.groups, per_group)[group]  # (out, in per group)
    return by_row.reshape(out_channels, per_group, *([1] * (conv.weight.dim() - 2)))


_NORMED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WHY = "prune_by activation or hessian"


def _input_norms(compressed: CompressedModel) -> dict[str, torch.Tensor]:
    """Per layer of the module (Linear, convolution, Conv1D): the L2 norm of each input
    feature (channel) over the calibration batches, taken once per compression."""
    if "input_norms" not in compressed.scratch:

        def squares(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if isinstance(layer, nn.Linear) or is_conv1d(layer):
                return x.pow(2).reshape(-1, x.shape[-1]).sum(0)
            weight = cast(torch.Tensor, layer.weight)
            channel = 1 if x.dim() == weight.dim() else 0  # batched, or one image
            return x.pow(2).transpose(0, channel).reshape(x.shape[channel], -1).sum(1)

        module = compressed.module
        names = {n for n, m in module.named_modules() if isinstance(m, _NORMED) or is_conv1d(m)}
        sums = over_calibration(compressed, names, squares, _WHY)
        compressed.scratch["input_norms"] = {n: s.sqrt() for n, s in sums.items()}
    return compressed.scratch["input_norms"]


def _hessian_layers(compressed: CompressedModel) -> set[str]:
    """The Linear parts of every layer the plan prunes by the Hessian before GPTQ."""
    return {
        part_name
        for name, lp in compressed.plan.layers.items()
        if lp.prune_by == "hessian" and lp.prune > 0
        for part_name, part in weighted_parts(compressed.module, name)
        if (isinstance(part, nn.Linear) or is_conv1d(part)) and not prunes_as_it_rounds(lp, part)
    }
