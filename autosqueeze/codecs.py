"""How one tensor is stored in an artifact: precision, scales, and dense or sparse layout.

Integer codecs (2-8 bits) are symmetric, so a pruned zero stays exactly zero, with one fp16
scale per output row (or per ``group_size`` weights of a row). Values are bit-packed: n
values at b bits take ceil(n*b/8) bytes. Any tensor with zeros may instead be stored as a
bitmap of its nonzeros plus the nonzeros alone; the encoder picks whichever is smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

INT_BITS = range(2, 9)
FLOAT_BITS = {16: torch.float16, 32: torch.float32}
SUPPORTED_BITS = (*INT_BITS, *FLOAT_BITS)


@dataclass(frozen=True)
class TensorCodec:
    """The storage a plan chose for a weight: ``bits`` and, for integers, the scale grouping."""

    bits: int = 32
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits}")


@dataclass
class Encoded:
    """The stored form: named parts (suffix -> tensor) and what is needed to decode them."""

    parts: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def encode(tensor: torch.Tensor, codec: TensorCodec = TensorCodec()) -> Encoded:
    """Encode a tensor; non-float tensors (e.g. BatchNorm's counter) are stored as they are."""
    tensor = tensor.detach().cpu()
    shape = list(tensor.shape)
    if not tensor.is_floating_point():
        return Encoded({"": tensor.contiguous()}, {"codec": "raw", "shape": shape})
    if codec.bits in FLOAT_BITS:
        values = tensor.to(FLOAT_BITS[codec.bits]).contiguous()
        return _smaller(
            Encoded({"": values}, {"codec": f"fp{codec.bits}", "layout": "dense", "shape": shape}),
            _bitmap(values.flatten(), values.flatten() != 0, {"codec": f"fp{codec.bits}"}, shape),
        )
    q, scale = quantize(tensor, codec.bits, codec.group_size)
    meta = {"codec": f"int{codec.bits}", "group_size": codec.group_size, "shape": shape}
    unsigned = (q.flatten() + _qmax(codec.bits)).to(torch.uint8)
    dense = Encoded(
        {"q": _pack(unsigned, codec.bits), "scale": scale},
        {**meta, "layout": "dense", "count": unsigned.numel()},
    )
    nonzero = q.flatten() != 0
    kept = unsigned[nonzero]
    sparse = Encoded(
        {"q": _pack(kept, codec.bits), "scale": scale, "mask": _pack_mask(nonzero)},
        {**meta, "layout": "bitmap", "count": kept.numel()},
    )
    return _smaller(dense, sparse)


def decode(parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The fp32 tensor an encoding stands for (raw tensors come back unchanged)."""
    shape = meta["shape"]
    n = math.prod(shape)
    codec = meta["codec"]
    if codec == "raw":
        return parts[""]
    mask = _unpack_mask(parts["mask"], n) if meta["layout"] == "bitmap" else None
    if codec.startswith("fp"):
        values = parts["values" if mask is not None else ""].float().flatten()
    else:
        bits = int(codec[3:])
        unsigned = _unpack(parts["q"], bits, meta["count"])
        values = unsigned.to(torch.int16) - _qmax(bits)
    if mask is not None:
        full = torch.zeros(n, dtype=values.dtype)
        full[mask] = values
        values = full
    if codec.startswith("fp"):
        return values.reshape(shape)
    return dequantize(values.reshape(shape), parts["scale"], meta["group_size"])


def quantize(
    tensor: torch.Tensor, bits: int, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: int8-held values in [-qmax, qmax] and fp16 scales (rows, groups).

    The scale is rounded *up* to fp16 before use, so no value clips and every element's error
    is at most half its scale.
    """
    rows = _grouped(tensor.float(), group_size)  # (rows, groups, group)
    amax = rows.abs().amax(dim=-1)
    qmax = _qmax(bits)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).clamp_min(2.0**-24)
    scale16 = scale.to(torch.float16)
    scale16 = _round_up_fp16(scale, scale16)
    q = torch.round(rows / scale16.float().unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
    return _ungrouped(q, tensor.shape), scale16.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None) -> torch.Tensor:
    grouped = _grouped(q.float(), group_size) * scale.float().unsqueeze(-1)
    return _ungrouped(grouped, q.shape)


def _round_up_fp16(exact: torch.Tensor, scale16: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= ``exact`` (nudged one ulp up where rounding went down)."""
    low = scale16.float() < exact
    if low.any():
        bits = scale16.view(torch.int16)
        bits[low] += 1  # positive fp16: the next bit pattern is the next larger value
    return scale16


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _grouped(tensor: torch.Tensor, group_size: int | None) -> torch.Tensor:
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
    width = rows.shape[1]
    size = min(group_size or width, width)
    groups = -(-width // size)
    padded = torch.nn.functional.pad(rows, (0, groups * size - width))
    return padded.reshape(rows.shape[0], groups, size)


def _ungrouped(grouped: torch.Tensor, shape: torch.Size | list[int]) -> torch.Tensor:
    rows = grouped.reshape(grouped.shape[0], -1)
    width = math.prod(shape) // rows.shape[0]
    return rows[:, :width].reshape(shape)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned b-bit values into bytes, little-endian bit order: ceil(n*b/8) bytes."""
    array = values.numpy().astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(array.copy())
    planes = (array[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    array = packed.numpy()
    if bits == 8:
        return torch.from_numpy(array[:count].copy())
    planes = np.unpackbits(array, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return torch.from_numpy((planes.astype(np.uint16) @ weights).astype(np.uint8))


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))


def _unpack_mask(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def _bitmap(
    flat: torch.Tensor, nonzero: torch.Tensor, meta: dict[str, Any], shape: list[int]
) -> Encoded:
    return Encoded(
        {"values": flat[nonzero].contiguous(), "mask": _pack_mask(nonzero)},
        {**meta, "layout": "bitmap", "shape": shape},
    )


def _smaller(dense: Encoded, sparse: Encoded) -> Encoded:
    return sparse if sparse.nbytes < dense.nbytes else dense
