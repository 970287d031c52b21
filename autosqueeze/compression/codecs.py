"""How one tensor is stored in an artifact: precision, scales, and dense or sparse layout.

Integer codecs (2-8 bits) are symmetric, so a pruned zero stays exactly zero, with one fp16
scale per output row (or per ``group_size`` weights of a row). Values are stored in whichever
of three layouts is smallest, by exact byte count:

- dense: bit-packed, n values at b bits in ceil(n*b/8) bytes;
- bitmap: a bitmap of the nonzeros plus the nonzeros alone, bit-packed (sparse tensors);
- coded: Huffman-coded (Deep Compression's entropy coding). Quantized weights crowd the
  levels near zero, so a level takes fewer than b bits on average: on all-MiniLM-L6-v2,
  12% fewer at 3 bits, 8% at 4, 4% at 8. The stream is raw DEFLATE with Huffman codes only
  (``zlib``: C speed both ways, a standard any language reads), over bytes that hold
  8 // b values each, so a byte is a whole number of values.

Shared values (``codebook``: weight sharing, Deep Compression's clustering) store 2**b fp16
values per tensor, found by 1-D k-means, and each weight's b-bit index into them, in the same
three layouts (a pruned zero keeps a value of its own, exactly 0).

Float tensors (fp16/fp32) are dense or bitmap.
"""

from __future__ import annotations

import heapq
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

INT_BITS = range(2, 9)
FLOAT_BITS = {16: torch.float16, 32: torch.float32}
SUPPORTED_BITS = (*INT_BITS, *FLOAT_BITS)


@dataclass(frozen=True)
class TensorCodec:
    """The storage a plan chose for a weight: ``bits`` and, for integers, the scale grouping;
    with ``codebook``, b-bit indices into 2**b shared values instead of a uniform grid."""

    bits: int = 32
    group_size: int | None = None
    codebook: bool = False
    rows: int | None = None  # with a codebook: rows sharing one (None: the whole tensor)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits}")
        if self.codebook and self.bits not in INT_BITS:
            raise ValueError(f"a codebook has 2**bits values, bits in 2-8, got {self.bits}")
        if self.rows is not None and (not self.codebook or self.rows < 1):
            raise ValueError(f"rows per codebook is a positive count with a codebook: {self}")


@dataclass(frozen=True)
class Format:
    """A stored tensor's number format as an encoding names it (``meta["codec"]``): ``raw``
    (as it was), ``fp16``/``fp32``, ``int2``-``int8`` (a uniform grid with scales) or
    ``cb2``-``cb8`` (indices into shared values). Named and parsed here alone."""

    kind: str  # "raw", "fp", "int" or "cb"
    bits: int = 0

    @property
    def name(self) -> str:
        return "raw" if self.kind == "raw" else f"{self.kind}{self.bits}"

    @classmethod
    def of(cls, name: object) -> Format:
        """The format ``name`` stands for; ValueError for any other name (an artifact is
        untrusted)."""
        found = KNOWN_FORMATS.get(name) if isinstance(name, str) else None
        if found is None:
            raise ValueError(f"its codec {name!r} is none of {list(KNOWN_FORMATS)}")
        return found


KNOWN_FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("raw"),
        *(Format("fp", bits) for bits in FLOAT_BITS),
        *(Format("int", bits) for bits in INT_BITS),
        *(Format("cb", bits) for bits in INT_BITS),
    ]
}


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
        return Encoded({"": tensor.contiguous()}, {"codec": Format("raw").name, "shape": shape})
    n = tensor.numel()
    if codec.bits in FLOAT_BITS:
        values = tensor.to(FLOAT_BITS[codec.bits]).contiguous()
        nonzero = values.flatten() != 0
        form = Format("fp", codec.bits).name
        if _sparse_is_smaller(n, int(torch.count_nonzero(nonzero)), 8 * values.element_size()):
            return _bitmap(values.flatten(), nonzero, {"codec": form}, shape)
        return Encoded({"": values}, {"codec": form, "layout": "dense", "shape": shape})
    if codec.codebook:
        return encode_shared(*shared_values(tensor, codec.bits, codec.rows), shape, codec.rows)
    q, scale = quantize(tensor, codec.bits, codec.group_size)
    return encode_quantized(q, scale, codec)


def encode_quantized(q: torch.Tensor, scale: torch.Tensor, codec: TensorCodec) -> Encoded:
    """The smallest layout of ``quantize``'s output."""
    bits = codec.bits
    meta = {
        "codec": Format("int", bits).name,
        "group_size": codec.group_size,
        "shape": list(q.shape),
    }
    unsigned = (q.flatten() + _qmax(bits)).to(torch.uint8)
    return _smallest_layout(unsigned, q.flatten() != 0, bits, {"scale": scale}, meta)


def encode_shared(
    levels: torch.Tensor,
    values: torch.Tensor,
    zero: int,
    shape: list[int],
    rows: int | None = None,
) -> Encoded:
    """The smallest layout of ``shared_values``' output (``shape``: the tensor's; ``rows``:
    the rows per codebook it was given)."""
    bits = int(values.shape[-1]).bit_length() - 1
    meta = {"codec": Format("cb", bits).name, "shape": shape, "zero": zero}
    if values.dim() == 2:  # a codebook per group of rows
        meta["rows"] = rows
    return _smallest_layout(levels, levels != zero, bits, {"codebook": values}, meta)


def _smallest_layout(
    unsigned: torch.Tensor,
    nonzero: torch.Tensor,
    bits: int,
    side: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> Encoded:
    """``bits``-bit levels (``nonzero``: those that do not stand for 0) in their smallest
    layout: the Huffman-coded stream where it beats the bit-packed one (dense or bitmap,
    whichever is smaller, decided before packing); ``side``: the parts decoding needs
    beside them (scales, a codebook)."""
    n = unsigned.numel()
    kept = int(torch.count_nonzero(nonzero))
    coded = _huffman(_joined(unsigned.numpy(), bits))
    if len(coded) < _packed_nbytes(n, kept, bits):
        stream = torch.frombuffer(bytearray(coded), dtype=torch.uint8)
        return Encoded({"q": stream, **side}, {**meta, "layout": "coded", "count": n})
    return _bit_packed(unsigned, nonzero, bits, side, meta)


def bit_packed(parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> Encoded:
    """An encoding as it would be without entropy coding: a coded one in the smaller of its
    bit-packed layouts (the same levels, so the same decoded tensor), others unchanged. What
    ``evaluate`` sets the coded file beside."""
    if meta.get("layout") != "coded":
        return Encoded(parts, meta)
    form = Format.of(meta["codec"])
    bits = form.bits
    zero = meta["zero"] if form.kind == "cb" else _qmax(bits)
    unsigned = _levels(parts, meta, bits, zero)
    side = {k: v for k, v in parts.items() if k != "q"}
    return _bit_packed(unsigned, unsigned != zero, bits, side, meta)


def _bit_packed(
    unsigned: torch.Tensor,
    nonzero: torch.Tensor,
    bits: int,
    side: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> Encoded:
    """The levels bit-packed, dense or as a bitmap of the nonzeros, whichever is smaller."""
    n = unsigned.numel()
    kept = int(torch.count_nonzero(nonzero))
    if _sparse_is_smaller(n, kept, bits):
        return Encoded(
            {"q": _pack(unsigned[nonzero], bits), **side, "mask": _pack_mask(nonzero)},
            {**meta, "layout": "bitmap", "count": kept},
        )
    return Encoded({"q": _pack(unsigned, bits), **side}, {**meta, "layout": "dense", "count": n})


def shared_values(
    tensor: torch.Tensor, bits: int, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Weight sharing: each value's level (uint8) among 2**bits shared fp16 values, found by
    1-D k-means (Lloyd's iterations from evenly spaced quantiles, on at most 2**20 evenly
    strided values: deterministic), sorted; and the level of an exact 0 (-1 where there is
    none). Exact zeros (pruned weights) get a value of their own, so they stay zero.

    With ``rows`` (fewer than the tensor has), each group of that many rows gets its own
    codebook, found on its own values: the values come back as (groups, 2**bits), each
    group's 0 (where the tensor has zeros) at level 0 and the rest sorted after it, so one
    zero level serves every group. Rows that differ in range (attention's value
    projections) then keep their own values, as per-row scales do for integers."""
    if rows is not None and tensor.dim() > 1 and rows < tensor.shape[0]:
        return _shared_by_rows(tensor, bits, rows)
    flat = tensor.detach().flatten().float()
    zeros = flat == 0
    has_zero = bool(zeros.any())
    count = 2**bits - (1 if has_zero else 0)
    found = _kmeans(flat[~zeros] if has_zero else flat, count)
    if has_zero:
        found = torch.cat([found, torch.zeros(1)])
    values = found.to(torch.float16).sort().values
    exact = values.float()
    levels = torch.bucketize(flat, (exact[1:] + exact[:-1]) / 2)
    zero = int(torch.nonzero(exact == 0)[0]) if has_zero else -1
    if has_zero:
        levels[zeros] = zero
    return levels.to(torch.uint8), values, zero


def _shared_by_rows(
    tensor: torch.Tensor, bits: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``shared_values`` with a codebook per group of ``rows`` rows (see there)."""
    matrix = tensor.detach().reshape(tensor.shape[0], -1).float()
    has_zero = bool((matrix == 0).any())
    levels, books = [], []
    for start in range(0, matrix.shape[0], rows):
        block = matrix[start : start + rows].flatten()
        if has_zero:
            kept = block != 0
            found = _kmeans_either(block[kept], 2**bits - 1).to(torch.float16).sort().values
            exact = found.float()
            level = torch.bucketize(block, (exact[1:] + exact[:-1]) / 2) + 1
            level[~kept] = 0
            books.append(torch.cat([torch.zeros(1, dtype=torch.float16), found]))
        else:
            found = _kmeans_either(block, 2**bits).to(torch.float16).sort().values
            exact = found.float()
            level = torch.bucketize(block, (exact[1:] + exact[:-1]) / 2)
            books.append(found)
        levels.append(level)
    return torch.cat(levels).to(torch.uint8), torch.stack(books), 0 if has_zero else -1


def codebook_index(
    levels: torch.Tensor, shape: list[int] | torch.Size, rows: int | None, count: int
) -> torch.Tensor:
    """Each value's index into its tensor's codebooks flattened: its level, in the codebook
    of its group of ``rows`` rows (each of ``count`` values); its level alone with one
    codebook (``rows`` None)."""
    index = levels.long().flatten()
    if rows is None:
        return index
    row = torch.arange(index.numel()) // max(1, math.prod(shape[1:]))
    return index + (row // rows) * count


def _kmeans_either(values: torch.Tensor, count: int) -> torch.Tensor:
    """``_kmeans`` from quantiles and from evenly spaced values, whichever ends with the
    smaller squared error. On a small group of rows the quantiles leave no centroid near a
    row's few large weights (Lloyd's iterations cannot move one there), which matter most;
    Deep Compression found evenly spaced starts best for that reason."""
    found = [_kmeans(values, count), _kmeans(values, count, spaced=True)]
    if values.numel() == 0:
        return found[0]

    def error(centroids: torch.Tensor) -> float:
        exact = centroids.to(torch.float16).float()
        nearest = exact[torch.bucketize(values, (exact[1:] + exact[:-1]) / 2)]
        return float((values - nearest).square().sum())

    return min(found, key=error)


def _kmeans(
    values: torch.Tensor, count: int, rounds: int = 30, spaced: bool = False
) -> torch.Tensor:
    """``count`` centroids of 1-D ``values`` (sorted; an empty input gives zeros), from
    evenly spaced quantiles (or, ``spaced``, values evenly spaced from the least to the
    largest). Values already on at most ``count`` levels (a decoded tensor) keep exactly
    those."""
    if values.numel() == 0:
        return torch.zeros(count)
    sample = values[:: max(1, values.numel() >> 20)].contiguous()  # bucketize warns on strides
    if sample.unique().numel() <= count and (levels := values.unique()).numel() <= count:
        return torch.cat([levels, levels[-1:].expand(count - levels.numel())])
    if spaced:
        centroids = torch.linspace(float(values.min()), float(values.max()), count)
    else:
        centroids = torch.quantile(
            sample[:: max(1, sample.numel() >> 16)], (torch.arange(count) + 0.5) / count
        )
    for _ in range(rounds):
        nearest = torch.bucketize(sample, (centroids[1:] + centroids[:-1]) / 2)
        sums = torch.zeros(count).index_add_(0, nearest, sample)
        members = torch.bincount(nearest, minlength=count).float()
        moved = torch.where(members > 0, sums / members.clamp_min(1), centroids).sort().values
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids


def encoded_nbytes(
    shape: tuple[int, ...] | list[int], codec: TensorCodec, nonzero: int | None = None
) -> int:
    """The bytes ``encode`` stores for a float tensor of ``shape`` with ``nonzero`` nonzero
    values after quantization (all, when None) in the bit-packed layouts: exact for a given
    count of nonzeros, and the most an integer tensor takes (Huffman coding is used only
    where it is smaller)."""
    n = math.prod(shape)
    nonzero = n if nonzero is None else nonzero
    if codec.codebook:
        rows = shape[0] if len(shape) > 1 else 1
        books = -(-rows // codec.rows) if codec.rows and codec.rows < rows else 1
        return _packed_nbytes(n, nonzero, codec.bits) + 2 * 2**codec.bits * books
    if codec.bits in FLOAT_BITS:
        width = 8 * FLOAT_BITS[codec.bits].itemsize
        if _sparse_is_smaller(n, nonzero, width):
            return nonzero * width // 8 + -(-n // 8)
        return n * width // 8
    rows = shape[0] if len(shape) > 1 else 1
    width = n // rows if n else 0
    groups = -(-width // min(codec.group_size or width, width)) if width else 0
    return _packed_nbytes(n, nonzero, codec.bits) + 2 * rows * groups


def _packed_nbytes(count: int, nonzero: int, bits: int) -> int:
    """The bytes of ``count`` bit-packed ``bits``-bit values with ``nonzero`` nonzeros, in
    the smaller of dense and bitmap (scales not counted)."""
    if _sparse_is_smaller(count, nonzero, bits):
        return -(-nonzero * bits // 8) + -(-count // 8)
    return -(-count * bits // 8)


def _sparse_is_smaller(count: int, nonzero: int, bits: int) -> bool:
    """Bitmap + nonzeros against dense, by exact byte count (the scales are the same in both),
    decided before either is packed."""
    return -(-nonzero * bits // 8) + -(-count // 8) < -(-count * bits // 8)


def check_encoding(parts: dict[str, torch.Tensor], meta: Any) -> None:
    """Raise ValueError unless ``parts`` are exactly what ``meta`` says ``encode`` stored:
    a known codec, and each part of the dtype and size its shape implies. An artifact is
    untrusted: this runs before ``decode`` allocates anything from those numbers."""
    if not isinstance(meta, dict):
        raise ValueError("its encoding is not a mapping")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"its shape {shape!r} is not a list of sizes")
    n = math.prod(shape)
    form = Format.of(meta.get("codec"))
    if form.kind == "raw":
        _expect(parts, {"": None}, n)
        return
    layout = meta.get("layout")
    if layout not in ("dense", "bitmap") and not (layout == "coded" and form.kind != "fp"):
        raise ValueError(f"its layout {layout!r} is none of dense, bitmap, coded (integers)")
    mask = -(-n // 8)
    if form.kind == "fp":
        if layout == "dense":
            _expect(parts, {"": FLOAT_BITS[form.bits]}, n)
        else:
            kept = parts.get("values")
            _expect(parts, {"values": FLOAT_BITS[form.bits], "mask": torch.uint8})
            if kept is None or kept.dim() != 1 or kept.numel() > n or parts["mask"].numel() != mask:
                raise ValueError("its bitmap and values do not match its shape")
        return
    count, bits = meta.get("count"), form.bits
    if type(count) is not int or not 0 <= count <= n:
        raise ValueError(f"its count {count!r} is not a number of values up to {n}")
    bitmap = {"mask": torch.uint8} if layout == "bitmap" else {}
    side = {"codebook": torch.float16} if form.kind == "cb" else {"scale": torch.float16}
    _expect(parts, {"q": torch.uint8, **side, **bitmap})
    if parts["q"].dim() != 1:
        raise ValueError("its packed values are not a flat stream")
    if layout != "coded" and parts["q"].numel() != -(-count * bits // 8):
        raise ValueError("its packed values do not match its count")
    if layout == "coded" and -(-count // _per_byte(bits)) > 8 * parts["q"].numel():
        # a Huffman code spends at least one bit a byte: more is a stream built to inflate
        raise ValueError("its coded values are too few bits for its shape")
    if layout == "bitmap" and parts["mask"].numel() != mask:
        raise ValueError("its bitmap does not match its shape")
    if layout != "bitmap" and count != n:
        raise ValueError("its count does not match its shape")
    if form.kind == "cb":
        zero, per = meta.get("zero"), meta.get("rows")
        rows = shape[0] if len(shape) > 1 else 1
        if per is not None and (type(per) is not int or not 1 <= per < rows):
            raise ValueError(f"its rows per codebook {per!r} is not a count below its {rows} rows")
        books = (-(-rows // per),) if per is not None else ()
        if parts["codebook"].shape != (*books, 2**bits):
            raise ValueError(f"its codebook does not hold the {2**bits} values of {form.name}")
        if type(zero) is not int or not (-1 <= zero < 2**bits) or layout == "bitmap" and zero < 0:
            raise ValueError(f"its zero level {zero!r} is not a level of its codebook")
        if zero >= 0 and bool((parts["codebook"][..., zero] != 0).any()):
            raise ValueError("its zero level does not hold 0")
        return
    group = meta.get("group_size")
    if group is not None and (type(group) is not int or group < 1):
        raise ValueError(f"its group_size {group!r} is not a positive integer")
    rows = shape[0] if len(shape) > 1 else 1
    width = n // rows if rows else 0
    groups = -(-width // min(group or width, width)) if width else 0
    if parts["scale"].numel() != rows * groups:
        raise ValueError("its scales do not match its shape and group size")


def _expect(
    parts: dict[str, torch.Tensor], wanted: dict[str, torch.dtype | None], n: int | None = None
) -> None:
    """``parts`` are the ``wanted`` names and dtypes (None: any); the first holds ``n`` values."""
    if set(parts) != set(wanted):
        raise ValueError(f"its parts are {sorted(parts)}, its codec stores {sorted(wanted)}")
    for name, dtype in wanted.items():
        if dtype is not None and parts[name].dtype != dtype:
            raise ValueError(f"its part {name!r} is {parts[name].dtype}, its codec stores {dtype}")
    first = parts[next(iter(wanted))]
    if n is not None and first.numel() != n:
        raise ValueError(f"it holds {first.numel()} values where its shape needs {n}")


def decode(parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """The fp32 tensor an encoding stands for (raw tensors come back unchanged)."""
    form = Format.of(meta["codec"])
    if form.kind == "raw":
        return parts[""]
    if form.kind == "fp":
        shape = meta["shape"]
        n = math.prod(shape)
        if meta["layout"] != "bitmap":
            return parts[""].float().reshape(shape)
        full = torch.zeros(n, dtype=torch.float32)
        full[_unpack_mask(parts["mask"], n)] = parts["values"].float()
        return full.reshape(shape)
    if form.kind == "cb":
        levels = _levels(parts, meta, form.bits, meta["zero"])
        book = parts["codebook"].float()
        index = codebook_index(levels, meta["shape"], meta.get("rows"), book.shape[-1])
        return book.flatten()[index].reshape(meta["shape"])
    q, scale = integers(parts, meta)
    return dequantize(q, scale, meta["group_size"])


def integers(
    parts: dict[str, torch.Tensor], meta: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """An integer encoding's values (int8-held, in [-qmax, qmax], the tensor's shape) and its
    fp16 scales (rows, groups): what ``decode`` multiplies, for a format that stores both
    (ONNX's ``DequantizeLinear``)."""
    bits = Format.of(meta["codec"]).bits
    unsigned = _levels(parts, meta, bits, _qmax(bits))
    values = (unsigned.to(torch.int16) - _qmax(bits)).to(torch.int8)
    return values.reshape(meta["shape"]), parts["scale"]


def _levels(
    parts: dict[str, torch.Tensor], meta: dict[str, Any], bits: int, zero: int
) -> torch.Tensor:
    """Every value's unsigned level, flat, whatever the layout (``zero``: the level the
    bitmap layout leaves out)."""
    n = math.prod(meta["shape"])
    if meta["layout"] == "coded":
        return _split(_unhuffman(parts["q"], -(-n // _per_byte(bits))), bits, n)
    unsigned = _unpack(parts["q"], bits, meta["count"])
    if meta["layout"] != "bitmap":
        return unsigned
    full = torch.full((n,), zero, dtype=torch.uint8)
    full[_unpack_mask(parts["mask"], n)] = unsigned
    return full


def quantize(
    tensor: torch.Tensor, bits: int, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: int8-held values in [-qmax, qmax] and fp16 scales (rows, groups).

    Each group's scale is the one of ``CLIP_FACTORS`` x its largest magnitude / qmax that
    gives the least squared error: clipping a group's few outliers buys its many small
    weights a finer grid (on MiniLM's weights, a third less error at 3 bits, an eighth at
    4). The scale is rounded *up* to fp16 before use; a weight the clipping leaves inside
    the grid is off by at most half its scale.
    """
    rows = _grouped(tensor.float(), group_size)  # (rows, groups, group)
    amax = rows.abs().amax(dim=-1)
    qmax = _qmax(bits)
    best_scale = best_error = None
    for factor in CLIP_FACTORS:
        scale = _fp16_scale(amax * factor / qmax)
        q = torch.round(rows / scale.float().unsqueeze(-1)).clamp(-qmax, qmax)
        error = (q * scale.float().unsqueeze(-1) - rows).square().sum(dim=-1)
        if best_scale is None or best_error is None:
            best_scale, best_error = scale, error
        else:
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.where(better, error, best_error)
    assert best_scale is not None
    q = torch.round(rows / best_scale.float().unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8)
    return _ungrouped(q, tensor.shape), best_scale.contiguous()


CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)
"""The clipping ranges tried per group, as fractions of its largest magnitude (1.0 first:
no clipping, kept where nothing does better)."""


def _fp16_scale(exact: torch.Tensor) -> torch.Tensor:
    """Scales in fp16, none below fp16's smallest, none rounded below ``exact``; 1 for an
    all-zero group."""
    exact = torch.where(exact > 0, exact, torch.ones_like(exact)).clamp_min(2.0**-24)
    return _round_up_fp16(exact, exact.to(torch.float16))


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
    """Pack unsigned b-bit values into bytes, little-endian bit order (value i's bit j is bit
    i*b + j of the stream): ceil(n*b/8) bytes. Eight values fill exactly b bytes, so each
    group of eight is shifted into one 64-bit word whose first b bytes are the group's."""
    array = values.numpy().astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(array.copy())
    groups = np.zeros((-(-len(array) // 8), 8), dtype=np.uint64)
    groups.reshape(-1)[: len(array)] = array
    words = (groups << (np.arange(8, dtype=np.uint64) * bits)).sum(axis=1, dtype=np.uint64)
    packed = words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
    return torch.from_numpy(packed[: -(-len(array) * bits // 8)].copy())


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    array = packed.numpy()
    if bits == 8:
        return torch.from_numpy(array[:count].copy())
    groups = -(-count // 8)
    stream = np.zeros(groups * bits, dtype=np.uint8)
    stream[: min(len(array), groups * bits)] = array[: groups * bits]
    padded = np.zeros((groups, 8), dtype=np.uint8)
    padded[:, :bits] = stream.reshape(groups, bits)
    words = padded.view("<u8").reshape(-1, 1)
    lanes = (words >> (np.arange(8, dtype=np.uint64) * bits)) & np.uint64((1 << bits) - 1)
    return torch.from_numpy(lanes.reshape(-1)[:count].astype(np.uint8))


def _per_byte(bits: int) -> int:
    """Values per byte of the coded stream: whole values only, so a byte's code stands for
    a fixed set of them (two 4-bit values, four 2-bit ones)."""
    return 8 // bits


def _joined(unsigned: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values, ``_per_byte(bits)`` to a byte (value i of a byte in bits
    i*b and up); the last byte padded with zeros."""
    k = _per_byte(bits)
    if k == 1:
        return unsigned.astype(np.uint8)
    rows = np.zeros((-(-len(unsigned) // k), k), dtype=np.uint8)
    rows.reshape(-1)[: len(unsigned)] = unsigned
    shifted = rows.astype(np.uint16) << (np.arange(k, dtype=np.uint16) * bits)
    return shifted.sum(axis=1).astype(np.uint8)


def _split(joined: np.ndarray, bits: int, count: int) -> torch.Tensor:
    k = _per_byte(bits)
    if k == 1:
        return torch.from_numpy(joined[:count].copy())
    lanes = (joined[:, None] >> (np.arange(k, dtype=np.uint8) * bits)) & ((1 << bits) - 1)
    return torch.from_numpy(lanes.reshape(-1)[:count].astype(np.uint8))


def _huffman(data: np.ndarray) -> bytes:
    """Raw DEFLATE, Huffman codes only (no string matching, which finds nothing in weights
    and costs time): each block of ~64K bytes gets the code of its own byte frequencies."""
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return coder.compress(data.tobytes()) + coder.flush()


def _unhuffman(stream: torch.Tensor, size: int) -> np.ndarray:
    """The ``size`` bytes a coded stream stands for. The stream is untrusted: inflating stops
    at ``size`` bytes, and anything but exactly ``size`` bytes then the stream's end is a
    ValueError."""
    inflater = zlib.decompressobj(-15)
    try:
        data = inflater.decompress(stream.numpy().tobytes(), size)
        extra = inflater.decompress(inflater.unconsumed_tail, 1)
    except zlib.error as exc:
        raise ValueError(f"its coded values are not a Huffman stream: {exc}") from None
    if len(data) != size or extra or not inflater.eof or inflater.unused_data:
        raise ValueError(f"its coded values do not decode to the {size} bytes its shape needs")
    return np.frombuffer(data, dtype=np.uint8)


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


def huffman_bits(counts: np.ndarray, bits: int) -> float:
    """The bits a Huffman code built for values with these ``counts`` (per unsigned level)
    takes to code them, joined ``8 // bits`` to a byte as the coded layout stores them
    (independent values: a byte's frequency is the product of its values'). The size model
    prices pruned layers from it; the coded layout's own stream differs from it by the
    headers and per-block codes of DEFLATE."""
    total = float(counts.sum())
    if total == 0:
        return 0.0
    k = _per_byte(bits)
    joint = counts / total
    for _ in range(k - 1):
        joint = np.outer(joint, counts / total).ravel()
    weights = [float(w) * total / k for w in joint if w > 0]
    if len(weights) == 1:
        return weights[0]  # DEFLATE gives a lone symbol a one-bit code
    heapq.heapify(weights)
    cost = 0.0
    while len(weights) > 1:  # each merge lengthens every code below it by one bit
        merged = heapq.heappop(weights) + heapq.heappop(weights)
        cost += merged
        heapq.heappush(weights, merged)
    return cost
