"""GPTQ (Frantar et al. 2022): integer rounding that compensates each input's rounding error.

Round-to-nearest rounds every weight alone. GPTQ rounds a layer's weight matrix W (outputs x
inputs) one input column at a time and moves each column's rounding error, times the inverse
Hessian's row, onto the columns not yet rounded, so that X W^T on the calibration inputs X
moves least (H = X^T X, the Optimal Brain Quantizer's update made cheap). As in the paper:
columns in blocks of 128 with lazy batch updates (a block's errors reach the columns after it
in one product), H damped by 1% of its mean diagonal, H^-1 through its upper Cholesky factor,
inputs that never fire on the calibration data given H_jj = 1 and weight 0.

The grid is the codec's (``codecs.quantize``): symmetric integers with one fp16 scale per
output row, or per ``group_size`` inputs of a row, each chosen by the codec's own
clipped-scale search on the weights before any is rounded ("static groups"), so that the
columns can be rounded in order of falling H_jj ("act order", the reference code's
``desc_act``): the inputs that carry most energy first, while most columns are left to take
their errors. On MiniLM, every Linear at 4 bits in groups of 64 (and the word embeddings at
4 bits): fidelity 0.9876 against 0.9855 for natural order with each group's scale chosen
when reached. Re-quantizing the rounded weight with ``quantize`` may pick other scales, so
the integers and scales chosen here are what the artifact stores (``CompressedModel.rounded``).

Weights already exactly zero (pruned first) stay zero: their column's error is that of
rounding to 0, moved on like any other (SparseGPT's mask kept while quantizing). Given a
share to prune (a layer pruned by the Hessian and rounded by GPTQ), the sweep does both at
once, SparseGPT's joint form: each block of columns, on its way, zeroes its share of the
weights of least w^2 / [H^-1]_jj^2 (the weights already updated by every error before it)
and rounds the rest. On MiniLM, every encoder Linear at 4 bits in groups of 64, 25% / 50%
pruned: fidelity 0.9837 / 0.9263, against 0.9809 / 0.9231 for SparseGPT then GPTQ with its
zeros kept (``benchmarks/sparsegpt_joint.py``).

Which weights this applies to is ``rounds``': Linear, Hugging Face's Conv1D (stored
transposed: its scales are per input, grouped along the outputs, so each column's scales
are chosen when GPTQ reaches it) and 1-D and 2-D convolutions, seen as (out, in/groups x
kernel) matrices, one conv group at a time, whose Hessian is that of the unfolded inputs
(``techniques.calibration``). Anything else rounds to nearest: an embedding (its input is an
index, there is no X^T X), a 3-D or transposed convolution, nn.MultiheadAttention's
``in_proj_weight`` (not a layer's ``weight``).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from autosqueeze.common.content_cache import ContentCache, content_key
from autosqueeze.compression.codecs import INT_BITS, dequantize, quantize
from autosqueeze.compression.kernels import is_conv1d
from autosqueeze.plans.plan import LayerPlan

BLOCK = 128
"""Columns rounded before their errors reach the columns after them (lazy batch updates)."""
DAMPING = 0.01
"""Added to H's diagonal, times its mean: keeps H invertible (the paper's 1%)."""
CONVS = (nn.Conv1d, nn.Conv2d)  # those whose inputs ``torch.nn.functional.unfold`` takes


def inverse_hessian(hessian: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + 1% of its mean diagonal)^-1, in float64, as GPTQ
    and SparseGPT walk it column by column. Inputs that never fire (a zero diagonal) get a
    unit diagonal, and their weights (``w``'s columns, zeroed in place) matter for nothing."""
    h = hessian.to(w.device).double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def rounds(layer: nn.Module) -> bool:
    """Whether GPTQ rounds ``layer``'s ``weight`` (others round to nearest)."""
    return isinstance(layer, (nn.Linear, *CONVS)) or is_conv1d(layer)


def prunes_as_it_rounds(layer_plan: LayerPlan, part: nn.Module) -> bool:
    """Whether GPTQ zeroes this part's pruned weights in its own sweep (SparseGPT's joint
    form): a Linear or Conv1D pruned by the Hessian, rounded by GPTQ, not smoothed between
    the two (smoothing rescales the columns the mask would be chosen on)."""
    return (
        layer_plan.prune > 0
        and layer_plan.prune_by == "hessian"
        and not layer_plan.smooth
        and rounds_by_gptq(layer_plan)
        and (isinstance(part, nn.Linear) or is_conv1d(part))
    )


def rounds_by_gptq(layer_plan: LayerPlan) -> bool:
    """GPTQ rounds integers only, and not where weight sharing replaces them (``cluster``)."""
    return (
        layer_plan.round_by == "gptq"
        and int(layer_plan.bits) in INT_BITS
        and not layer_plan.cluster
    )


def round_layer(
    layer: nn.Module,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    prune: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on ``layer.weight`` (``rounds(layer)``) with its inputs' Hessian (a convolution's:
    one per conv group, stacked): the integers (int8-held, the weight's shape) and fp16 scales
    (rows, groups) the codec stores, on the CPU, shared (read only). The weight is set, in
    place, to what they decode to. ``prune``: the share of a Linear's (or Conv1D's) weights
    zeroed in the same sweep (the module docstring).

    Kept by the content of the weight and the Hessian (``_ROUNDED``): a search rounds the same
    layers of the same model trial after trial, and rounding is most of what a trial with
    kept Hessians spends compressing (8 s for every encoder Linear of MiniLM, one thread)."""
    weight = cast(torch.Tensor, layer.weight)
    groups = int(getattr(layer, "groups", 1))
    form = (bits, group_size, prune, is_conv1d(layer), groups, str(weight.device))  # GPUs differ
    key = (content_key(weight), content_key(hessian), *form)
    q, scale = _ROUNDED.get(key, lambda: _round_layer(layer, hessian, bits, group_size, prune))
    with torch.no_grad():
        weight.copy_(dequantize(q, scale, group_size).to(weight))
    return q, scale


_ROUNDED: ContentCache[tuple[torch.Tensor, torch.Tensor]] = ContentCache(
    1 << 30, lambda found: found[0].numel() + 2 * found[1].numel()
)


def _round_layer(
    layer: nn.Module, hessian: torch.Tensor, bits: int, group_size: int | None, prune: float
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = cast(torch.Tensor, layer.weight).detach()
    if is_conv1d(layer):  # stored (in, out): a Linear's weight transposed
        return round_matrix(weight.t(), hessian, bits, group_size, transposed=True, prune=prune)
    if prune and not isinstance(layer, nn.Linear):
        raise ValueError("GPTQ prunes as it rounds a Linear's or Conv1D's weight only")
    groups = int(getattr(layer, "groups", 1))
    rows = weight.reshape(weight.shape[0], -1)
    hessians = hessian.reshape(groups, *hessian.shape[-2:])
    found = [
        round_matrix(block, h, bits, group_size, prune=prune)
        for block, h in zip(rows.chunk(groups), hessians, strict=True)
    ]
    return torch.cat([f[0] for f in found]).reshape(weight.shape), torch.cat([f[1] for f in found])


def round_matrix(
    matrix: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    transposed: bool = False,
    prune: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on ``matrix`` (outputs x inputs) with H = X^T X of its inputs: the integers and
    fp16 scales of the weight as the codec stores it, ``matrix`` itself or (``transposed``:
    Conv1D) its transpose, so the scales are per row of that (and per ``group_size``
    values of a row); with ``prune``, ``round(prune * n)`` of them zero (SparseGPT's joint
    form: spread over the blocks as SparseGPT spreads them)."""
    w = matrix.detach().double().clone()
    rows, cols = w.shape
    keep_zero = matrix.detach() == 0  # pruned: stays zero
    stored_rows, width = (cols, rows) if transposed else (rows, cols)
    group = group_size if group_size and group_size < width else None
    if transposed:  # natural order; a column's scales are its stored row's, chosen when reached
        order = torch.arange(cols, device=w.device)
        shape = (stored_rows, -(-width // (group or width)))
        scales = torch.empty(shape, dtype=torch.float16, device=w.device)
    else:  # the module docstring: scales first, then columns by falling H_jj
        width_of = group or cols
        parts = zip(w.split(width_of, dim=1), keep_zero.split(width_of, dim=1), strict=True)
        chosen = [quantize(p.masked_fill(z, 0).float(), bits, None)[1] for p, z in parts]
        scales = torch.cat(chosen, dim=1)
        order = torch.argsort(torch.diagonal(hessian).to(w.device), descending=True, stable=True)
        w, keep_zero = w[:, order], keep_zero[:, order]
        hessian = hessian.to(w.device)[order][:, order]
    inverse = inverse_hessian(hessian, w)
    qmax = 2 ** (bits - 1) - 1
    q = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
    total, done = round(prune * w.numel()), 0
    for start in range(0, cols, BLOCK):
        end = min(start + BLOCK, cols)
        block, hinv = w[:, start:end].clone(), inverse[start:end, start:end]
        errors = torch.zeros_like(block)
        if total:
            count = round(total * end / cols) - done
            done += count
            keep_zero[:, start:end] |= least_salient(block, hinv, count)
        for i in range(end - start):
            column, zero, j = block[:, i], keep_zero[:, start + i], int(order[start + i])
            if transposed:
                found = quantize(column.masked_fill(zero, 0).float()[None, :], bits, group)[1]
                scales[j] = found[0]
                scale = found[0].repeat_interleave(group or rows)[:rows]
            else:
                scale = scales[:, j // group if group else 0]
            levels = torch.round(column.float() / scale.float()).clamp(-qmax, qmax)
            levels = levels.masked_fill(zero, 0)
            rounded = (levels * scale.float()).double()
            error = (column - rounded) / hinv[i, i]
            block[:, i:] -= error[:, None] * hinv[i, i:][None, :]
            block[:, i] = rounded
            errors[:, i] = error
            q[:, j] = levels.to(torch.int8)
        w[:, start:end] = block
        w[:, end:] -= errors @ inverse[start:end, end:]
    if transposed:
        return q.t().contiguous().cpu(), scales.cpu()
    return q.cpu(), scales.cpu()


def least_salient(block: torch.Tensor, hinv: torch.Tensor, count: int) -> torch.Tensor:
    """SparseGPT's mask for a block: the ``count`` weights of least w^2 / [H^-1]_jj^2 (the
    error their removal costs the layer's outputs), ties broken by position."""
    score = block.pow(2) / torch.diagonal(hinv).pow(2)
    mask = torch.zeros(block.numel(), dtype=torch.bool, device=block.device)
    mask[torch.argsort(score.flatten(), stable=True)[:count]] = True
    return mask.reshape(block.shape)
