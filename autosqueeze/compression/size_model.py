"""The size model: a layer's bytes in the artifact, predicted from a plan without building it.

The knapsack weighs every combination of a layer's bits, pruning and rank, so each must be
priced without compressing the model. A layer's weights are quantized once per bit width
(``stored_weights``); that gives their exact stored bytes, and the census of their levels
that prices pruning: magnitude pruning takes the smallest weights, which are the ones on
the levels nearest zero, so a pruned layer is its census with that many values moved to
level zero, coded as the codec would code it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from autosqueeze.compression.codecs import (
    FLOAT_BITS,
    TensorCodec,
    encode_quantized,
    encode_shared,
    encoded_nbytes,
    huffman_bits,
    quantize,
    shared_values,
)
from autosqueeze.compression.kernels import OrtInt4, kernel_for
from autosqueeze.compression.techniques.base import matrices
from autosqueeze.compression.techniques.factorize import factor_shapes
from autosqueeze.plans.knob_facts import KNOBS


@dataclass(frozen=True)
class StoredMatrix:
    """One weight matrix quantized at one bit width, as the artifact stores it."""

    shape: tuple[int, ...]
    nbytes: int  # exactly what ``encode`` stores
    zeros: int  # values that quantization alone sends to zero
    counts: np.ndarray | None = None  # integers: values per unsigned level (0 .. 2 qmax)
    scale_bytes: int = 0  # what is stored beside the values: fp16 scales, or the codebook
    sample: torch.Tensor | None = None  # shared values: evenly strided weights, to re-cluster
    priced: dict[float, int] = field(default_factory=dict, compare=False)  # prune -> coded


@dataclass(frozen=True)
class StoredWeights:
    """A layer's matrices at one bit width and group size (or as indices into a codebook
    of 2**bits shared values)."""

    bits: int
    group_size: int | None
    matrices: tuple[StoredMatrix, ...]
    codebook: bool = False
    rows: int | None = None  # rows per codebook (shared values)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)

    @property
    def zeros(self) -> float:
        """The fraction of the layer's weights that quantizing alone rounds to zero (with one
        scale per row, a row's outlier sends many of its small weights there)."""
        total = sum(math.prod(m.shape) for m in self.matrices)
        return sum(m.zeros for m in self.matrices) / total if total else 0.0


def stored_weights(
    layer: nn.Module,
    bits: int,
    group_size: int | None,
    cluster: int = 0,
    cluster_rows: int | None = None,
) -> StoredWeights:
    """Quantize ``layer``'s matrices to ``bits`` (fp16/fp32: cast), or share 2**``cluster``
    values among them (a codebook per ``cluster_rows`` rows), and take their census."""
    if cluster:
        shared = []
        for matrix in matrices(layer).values():
            weight = matrix.detach().cpu()
            levels, values, zero = shared_values(weight, int(cluster), cluster_rows)
            nbytes = encode_shared(levels, values, zero, list(matrix.shape), cluster_rows).nbytes
            counts = np.bincount(levels.numpy(), minlength=values.shape[-1])
            flat = weight.flatten()
            sample = flat[:: max(1, flat.numel() // SAMPLE)].clone()
            side = 2 * values.numel()  # the fp16 codebooks
            shared.append(StoredMatrix(tuple(matrix.shape), nbytes, 0, counts, side, sample))
        return StoredWeights(int(cluster), None, tuple(shared), True, cluster_rows)
    codec = TensorCodec(int(bits), group_size if int(bits) < 16 else None)
    found = []
    for matrix in matrices(layer).values():
        weight = matrix.detach().cpu()
        shape = tuple(weight.shape)
        if bits in FLOAT_BITS:  # tiny weights underflow in fp16
            zeros = weight.numel() - int(torch.count_nonzero(weight.to(FLOAT_BITS[bits])))
            nbytes = encoded_nbytes(shape, codec, weight.numel() - zeros)
            found.append(StoredMatrix(shape, nbytes, zeros))
            continue
        q, scale = quantize(weight, bits, codec.group_size)
        counts = np.bincount(
            q.flatten().long().numpy() + 2 ** (bits - 1) - 1, minlength=2**bits - 1
        )
        encoded = encode_quantized(q, scale, codec)
        zeros = q.numel() - int(torch.count_nonzero(q))
        found.append(StoredMatrix(shape, encoded.nbytes, zeros, counts, 2 * scale.numel()))
    return StoredWeights(bits, codec.group_size, tuple(found))


SIZE_KNOBS = tuple(name for name, knob in KNOBS.items() if knob.sized)
"""The knobs whose bytes ``layer_bytes`` predicts (the knapsack prices these; docs/search.md)."""


def layer_bytes(
    layer: nn.Module, stored: StoredWeights, prune: float = 0.0, rank: float = 1.0
) -> int:
    """Predicted bytes of ``layer``'s weights as ``stored`` (integers, or shared values)
    with ``prune`` and ``rank``.

    Exact with neither. Pruned: the census with the pruned share moved to level zero, in the
    bit-packed layouts' exact bytes for that many nonzeros or the Huffman estimate of the
    coded one (scaled by how the real stream compared with the estimate unpruned),
    whichever is smaller, as the encoder chooses (shared values: the bit-packed bytes).
    Factorized: the factors' bit-packed bytes, times the share coding saved on the layer
    itself (their values are not known here)."""
    if prune == 0 and rank >= 1:
        return stored.nbytes
    codec = TensorCodec(
        stored.bits, stored.group_size if stored.bits < 16 else None, stored.codebook, stored.rows
    )
    if rank < 1:
        packed = sum(
            encoded_nbytes(m.shape, codec, math.prod(m.shape) - m.zeros) for m in stored.matrices
        )
        # what coding saved on the layer carries over to integer factors (the same grid);
        # shared values are clustered afresh per factor: priced bit-packed
        saved = min(1.0, stored.nbytes / packed) if packed and not stored.codebook else 1.0
        shapes = factor_shapes(layer, rank)
        return round(
            saved
            * sum(
                encoded_nbytes(shape, codec, n - round(prune * n))
                for shape in shapes
                if (n := math.prod(shape))
            )
        )
    return sum(_pruned_bytes(m, codec, prune) for m in stored.matrices)


def onnx_layer_bytes(layer: nn.Module, values: dict[str, Any], group_size: int | None) -> int:
    """A layer's weight bytes in its ONNX export (``export.export_onnx``), where weights are stored
    dense: int8 with an fp32 scale per row where one of ONNX Runtime's int8 kernels runs the layer
    (int4 with one per block of ``OrtInt4.block`` for its MatMulNBits), int8 at 5-8 bits and int4 at
    4 bits and fewer with the artifact's fp16 scales (per row or group), fp32 otherwise (16 bits and
    shared values are decoded there). Pruning saves nothing in that file; a rank, its factors'
    weights."""
    bits, cluster = int(values.get("bits", 32)), int(values.get("cluster", 0))
    rank = float(values.get("rank", 1.0))
    shapes = factor_shapes(layer, rank) if rank < 1 else [m.shape for m in matrices(layer).values()]
    kernel = kernel_for(str(values.get("kernel", "fp32")))
    integer = bool(kernel.ort_quantizer)
    if not integer and (cluster or bits > 8):
        return sum(4 * math.prod(shape) for shape in shapes)
    width = kernel.weight_bits / 8 if integer else 0.5 if bits <= 4 else 1.0
    total = 0
    for shape in shapes:
        rows, cols = shape[0], math.prod(shape[1:])
        groups = math.ceil(cols / group_size) if group_size and group_size < cols else 1
        if kernel.ort_quantizer == "int4":  # MatMulNBits: an fp32 scale per block
            scales = 4 * rows * math.ceil(cols / OrtInt4.block)
        else:  # ORT's int8 kernels: an fp32 scale per row; the artifact's fp16 ones
            scales = 4 * rows if integer else 2 * rows * groups
        total += math.ceil(width * rows * cols) + scales
    return total


SAMPLE = 1 << 16
"""Weights kept per matrix to price shared values after pruning (re-clustered, censused)."""


def _pruned_bytes(matrix: StoredMatrix, codec: TensorCodec, prune: float) -> int:
    n = math.prod(matrix.shape)
    zeros = max(round(prune * n), matrix.zeros)
    packed = encoded_nbytes(matrix.shape, codec, n - zeros)
    # shared values (counted with their sample): the unpruned stream says how coding fares
    if matrix.sample is not None and matrix.counts is not None:
        if prune not in matrix.priced:  # the knapsack asks once per combination of knobs
            matrix.priced[prune] = _shared_coded_bytes(matrix.sample, codec.bits, prune, n)
        estimate = matrix.priced[prune]
        if matrix.nbytes < encoded_nbytes(matrix.shape, codec, n):  # coded: scale alike
            unpruned = math.ceil(huffman_bits(matrix.counts, codec.bits) / 8)
            estimate = round(estimate * (matrix.nbytes - matrix.scale_bytes) / unpruned)
        return min(packed, matrix.scale_bytes + estimate)
    if matrix.counts is None:
        return packed
    unpruned_packed = encoded_nbytes(matrix.shape, codec, n - matrix.zeros)
    if matrix.nbytes >= unpruned_packed:  # coding did not pay unpruned: price by packing
        return packed
    coded = matrix.nbytes - matrix.scale_bytes
    unpruned_bits = huffman_bits(matrix.counts, codec.bits)
    pruned = huffman_bits(_moved_to_zero(matrix.counts, zeros), codec.bits)
    return min(packed, matrix.scale_bytes + round(coded * pruned / unpruned_bits))


def _shared_coded_bytes(sample: torch.Tensor, bits: int, prune: float, n: int) -> int:
    """The coded bytes of a matrix of ``n`` weights pruned by ``prune`` then clustered,
    estimated from its sample pruned and clustered the same way (the levels' census)."""
    pruned = sample.clone()
    pruned[torch.argsort(pruned.abs(), stable=True)[: round(prune * pruned.numel())]] = 0
    levels, _, _ = shared_values(pruned, bits)
    counts = np.bincount(levels.numpy(), minlength=2**bits) * (n / pruned.numel())
    return math.ceil(huffman_bits(counts, bits) / 8)


def _moved_to_zero(counts: np.ndarray, zeros: int) -> np.ndarray:
    """The census after magnitude pruning leaves ``zeros`` values at zero: values leave the
    levels nearest zero first (both signs in proportion)."""
    counts = counts.astype(np.float64).copy()
    centre = len(counts) // 2
    need = zeros - counts[centre]
    for step in range(1, centre + 1):
        if need <= 0:
            break
        pair = counts[centre - step] + counts[centre + step]
        take = min(need, pair)
        if pair:
            counts[centre - step] -= take * counts[centre - step] / pair
            counts[centre + step] -= take * counts[centre + step] / pair
        counts[centre] += take
        need -= take
    return counts
