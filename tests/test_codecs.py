import math

import pytest
import torch

from autosqueeze.compression.codecs import (
    KNOWN_FORMATS,
    SUPPORTED_BITS,
    Format,
    TensorCodec,
    check_encoding,
    decode,
    dequantize,
    encode,
    encoded_nbytes,
    quantize,
)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [None, 16, 100])
def test_quantization_error_is_at_most_half_a_scale_inside_the_grid_and_clipping_only_helps(
    bits, group_size
):
    torch.manual_seed(bits)
    weight = torch.randn(12, 80) * 0.3
    weight[0, 3] = 4.0  # an outlier: its group gains from clipping it
    encoded = encode(weight, TensorCodec(bits, group_size))
    restored = decode(encoded.parts, encoded.meta)
    _, scale = quantize(weight, bits, group_size)
    size = min(group_size or 80, 80)
    per_element = scale.float().repeat_interleave(size, dim=1)[:, :80]
    inside = weight.abs() <= per_element * (2 ** (bits - 1) - 1)
    error = (weight - restored).abs()
    assert torch.all(error[inside] <= per_element[inside] / 2 + 1e-7)
    assert scale.dtype == torch.float16 and scale.shape == (12, math.ceil(80 / size))
    # per group, no more squared error than the unclipped grid (largest magnitude / qmax)
    groups = weight.reshape(12, -1, size) if 80 % size == 0 else None
    if groups is not None:
        qmax = 2 ** (bits - 1) - 1
        exact = groups.abs().amax(-1, keepdim=True) / qmax
        half = exact.half()
        half.view(torch.int16)[half.float() < exact] += 1  # rounded up to fp16, as stored
        plain = half.float()
        unclipped = (torch.round(groups / plain).clamp(-qmax, qmax) * plain - groups).square()
        clipped = (restored.reshape(12, -1, size) - groups).square()
        assert torch.all(clipped.sum(-1) <= unclipped.sum(-1))
        if bits <= 4:  # where the grid is coarse, the outlier's group gains
            assert clipped.sum() < unclipped.sum()


@pytest.mark.parametrize(
    ("bits", "group_size", "expected"),
    [
        (8, None, 1000 + 10 * 2),  # one byte a value, one fp16 scale a row
        (4, None, 500 + 10 * 2),
        (3, 32, math.ceil(1000 * 3 / 8) + 10 * 4 * 2),  # four groups of <= 32 per row
        (2, None, 250 + 10 * 2),
        (16, None, 2000),
        (32, None, 4000),
    ],
)
def test_dense_packed_sizes_are_exact(bits, group_size, expected):
    weight = torch.linspace(-1, 1, 1000).reshape(10, 100) + 0.001  # no exact zeros
    codec = TensorCodec(bits, group_size)
    encoded = encode(weight, codec)
    assert encoded_nbytes(weight.shape, codec) == expected
    assert encoded.meta["layout"] in ("dense", "coded")  # coded only where it is smaller
    assert (
        encoded.nbytes == expected
        if encoded.meta["layout"] == "dense"
        else expected > encoded.nbytes
    )


def test_sparse_layout_is_chosen_only_when_smaller():
    weight = torch.linspace(0.1, 1, 1000).reshape(10, 100)
    half = weight.clone()
    half[:, ::2] = 0
    codec = TensorCodec(8)
    # bitmap of 1000 bits + 500 nonzero bytes + scales, instead of 1000 bytes + scales
    assert encoded_nbytes(half.shape, codec, nonzero=500) == 125 + 500 + 20
    encoded = encode(half, codec)
    assert encoded.meta["layout"] in ("bitmap", "coded")  # coded only where it is smaller
    assert encoded.nbytes <= 125 + 500 + 20
    # at 2 bits, a bitmap (1 bit a weight) costs more than it saves for 50 % zeros
    assert encoded_nbytes(half.shape, TensorCodec(2), nonzero=500) == 250 + 20
    assert encode(half, TensorCodec(2)).meta["layout"] != "bitmap"
    assert torch.equal(decode(encoded.parts, encoded.meta) == 0, half == 0)


def test_pruned_zeros_stay_exactly_zero_and_fp32_is_lossless():
    weight = torch.randn(16, 16)
    weight[weight.abs() < 0.8] = 0
    for bits in SUPPORTED_BITS:
        encoded = encode(weight, TensorCodec(bits))
        restored = decode(encoded.parts, encoded.meta)
        assert torch.all(restored[weight == 0] == 0)
    lossless = encode(weight, TensorCodec(32))
    assert torch.equal(decode(lossless.parts, lossless.meta), weight)


def test_all_zero_and_non_float_tensors_round_trip():
    zeros = torch.zeros(3, 5)
    encoded = encode(zeros, TensorCodec(4))
    assert torch.equal(decode(encoded.parts, encoded.meta), zeros)
    counter = torch.tensor(7, dtype=torch.long)
    raw = encode(counter, TensorCodec(4))
    assert raw.meta["codec"] == "raw" and torch.equal(decode(raw.parts, raw.meta), counter)


def test_unsupported_bits_are_rejected():
    with pytest.raises(ValueError, match="bits must be one of"):
        TensorCodec(1)


@pytest.mark.parametrize("bits", range(2, 8))
def test_packing_keeps_the_bit_plane_layout_of_earlier_artifacts(bits):
    import numpy as np

    from autosqueeze.compression.codecs import _pack, _unpack

    for count in (1, 3, 8, 9, 1001):
        values = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(count))
        planes = (values.numpy()[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
        layout = np.packbits(planes.reshape(-1), bitorder="little")  # value i, bit j at i*b+j
        assert np.array_equal(_pack(values.to(torch.uint8), bits).numpy(), layout)
        assert torch.equal(_unpack(torch.from_numpy(layout), bits, count), values.to(torch.uint8))


@pytest.mark.parametrize("bits", range(2, 9))
def test_huffman_coding_is_lossless_and_used_where_it_is_smaller(bits):
    """Bell-shaped weights crowd the levels near zero: coding them beats bit-packing, and
    decoding gives exactly the values bit-packing would."""
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    weight[:, :10] *= 6  # a few outliers per row, as trained weights have
    codec = TensorCodec(bits, 32)
    encoded = encode(weight, codec)
    q, scale = quantize(weight, bits, 32)
    assert encoded.meta["layout"] == "coded"
    assert encoded.nbytes < encoded_nbytes(weight.shape, codec)
    check_encoding(encoded.parts, encoded.meta)
    assert torch.equal(decode(encoded.parts, encoded.meta), dequantize(q, scale, 32))


def test_a_coded_stream_that_does_not_decode_to_its_shape_is_refused():
    import zlib

    encoded = encode(
        torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), TensorCodec(4)
    )
    assert encoded.meta["layout"] == "coded"
    stream = encoded.parts["q"]
    coder = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = coder.compress(bytes(1 << 24)) + coder.flush()  # 16 MiB of zeros in ~16 KiB
    cases = {
        "truncated": stream[: len(stream) // 2],
        "garbage": torch.full((100,), 0xFF, dtype=torch.uint8),
        "too long": torch.frombuffer(bytearray(bomb), dtype=torch.uint8),
        "trailing bytes": torch.cat([stream, torch.tensor([1, 2, 3], dtype=torch.uint8)]),
    }
    for case, q in cases.items():
        parts = {**encoded.parts, "q": q}
        if case == "too long":  # more than 8 bytes a byte: refused before inflating
            with pytest.raises(ValueError, match="too few bits"):
                check_encoding(
                    parts, {**encoded.meta, "shape": [1 << 12, 1 << 12], "count": 1 << 24}
                )
        with pytest.raises(ValueError, match="coded values"):  # by its size, or decoding
            check_encoding(parts, encoded.meta)
            decode(parts, encoded.meta)
        assert case


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("pruned", [False, True])
def test_shared_values_decode_bit_for_bit_and_their_sizes_are_exact(bits, pruned):
    """Weight sharing: the decoded tensor is exactly the codebook at the stored levels; a
    pruned zero stays zero; packed bytes are exactly what the size model computes (coded
    ones only where fewer); decoding and encoding again changes nothing."""
    from autosqueeze.compression.codecs import shared_values

    torch.manual_seed(bits)
    weight = torch.randn(40, 72) * 0.2
    if pruned:
        weight[weight.abs() < 0.15] = 0
    codec = TensorCodec(bits, codebook=True)
    encoded = encode(weight, codec)
    check_encoding(encoded.parts, encoded.meta)
    restored = decode(encoded.parts, encoded.meta)
    levels, values, zero = shared_values(weight, bits)
    assert values.dtype == torch.float16 and values.shape == (2**bits,)
    assert torch.equal(restored, values.float()[levels.long()].view(40, 72))
    assert (restored[weight == 0] == 0).all() and (zero >= 0) == pruned
    assert restored.unique().numel() <= 2**bits
    nonzero = int(torch.count_nonzero(restored))
    if encoded.meta["layout"] == "coded":
        assert encoded.nbytes < encoded_nbytes([40, 72], codec, nonzero)
    else:
        assert encoded.nbytes == encoded_nbytes([40, 72], codec, nonzero)
    again = encode(restored, codec)
    assert torch.equal(decode(again.parts, again.meta), restored)


def test_shared_values_fit_a_layer_better_than_a_uniform_grid_at_low_bits():
    """Four well-separated values with a little noise: 2-bit sharing finds the four; a
    symmetric 2-bit grid has three levels and cannot."""
    torch.manual_seed(0)
    centres = torch.tensor([-0.9, -0.1, 0.2, 1.3])
    weight = centres[torch.randint(0, 4, (32, 64))] + 0.01 * torch.randn(32, 64)
    shared = encode(weight, TensorCodec(2, codebook=True))
    uniform = encode(weight, TensorCodec(2))
    assert torch.allclose(shared.parts["codebook"].float().sort().values, centres, atol=0.01)
    error = {
        name: float((decode(e.parts, e.meta) - weight).square().mean())
        for name, e in (("shared", shared), ("uniform", uniform))
    }
    assert error["shared"] < 0.01 * error["uniform"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, m: p.update(codebook=p["codebook"][:3]), "codebook does not hold"),
        (lambda p, m: m.update(zero=99), "zero level"),
        (lambda p, m: m.update(zero=(m["zero"] + 1) % 4), "zero level does not hold 0"),
        (lambda p, m: p.update(codebook=p["codebook"].float()), "codebook"),
    ],
)
def test_a_forged_codebook_is_refused(change, message):
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    weight[0] = 0  # pruned: a level holds exactly 0
    encoded = encode(weight, TensorCodec(2, codebook=True))
    parts, meta = dict(encoded.parts), dict(encoded.meta)
    change(parts, meta)
    with pytest.raises(ValueError, match=message):
        check_encoding(parts, meta)


@pytest.mark.parametrize("rows", [1, 8, 15])
@pytest.mark.parametrize("pruned", [False, True])
def test_a_codebook_per_group_of_rows_decodes_bit_for_bit_and_its_size_is_exact(rows, pruned):
    """``cluster_rows``: each group of rows indexes its own codebook (the last group may be
    short); a pruned zero is level 0 of every one and stays zero; packed bytes exact."""
    from autosqueeze.compression.codecs import shared_values

    torch.manual_seed(rows)
    weight = torch.randn(40, 72) * torch.linspace(0.05, 1.0, 40)[:, None]  # rows differ
    if pruned:
        weight[weight.abs() < 0.05] = 0
    codec = TensorCodec(3, codebook=True, rows=rows)
    encoded = encode(weight, codec)
    check_encoding(encoded.parts, encoded.meta)
    restored = decode(encoded.parts, encoded.meta)
    levels, values, zero = shared_values(weight, 3, rows)
    groups = -(-40 // rows)
    assert values.shape == (groups, 8) and encoded.meta["rows"] == rows
    book = torch.arange(40).repeat_interleave(72) // rows
    assert torch.equal(restored.flatten(), values.float()[book, levels.long()])
    assert (restored[weight == 0] == 0).all() and zero == (0 if pruned else -1)
    nonzero = int(torch.count_nonzero(restored))
    if encoded.meta["layout"] == "coded":
        assert encoded.nbytes < encoded_nbytes([40, 72], codec, nonzero)
    else:
        assert encoded.nbytes == encoded_nbytes([40, 72], codec, nonzero)
    # rows that differ in range: their own codebooks fit them better than one for all
    one = encode(weight, TensorCodec(3, codebook=True))
    error = {
        name: float((decode(e.parts, e.meta) - weight).square().mean())
        for name, e in (("rows", encoded), ("one", one))
    }
    assert error["rows"] < error["one"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, m: m.update(rows=40), "rows per codebook"),
        (lambda p, m: m.update(rows="8"), "rows per codebook"),
        (lambda p, m: m.update(rows=4), "codebook does not hold"),
        (lambda p, m: p.update(codebook=p["codebook"].flip(1)), "zero level does not hold 0"),
    ],
)
def test_a_forged_codebook_per_group_of_rows_is_refused(change, message):
    weight = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    weight[0] = 0
    encoded = encode(weight, TensorCodec(2, codebook=True, rows=8))
    parts, meta = dict(encoded.parts), dict(encoded.meta)
    change(parts, meta)
    with pytest.raises(ValueError, match=message):
        check_encoding(parts, meta)


@pytest.mark.parametrize(
    ("codec", "format_name"),
    [(TensorCodec(32), "fp32"), (TensorCodec(16), "fp16"), (TensorCodec(4, 8), "int4"),
     (TensorCodec(3, codebook=True), "cb3")],
)  # fmt: skip
def test_an_encoding_names_its_format_and_the_name_parses_back(codec, format_name):
    named = encode(torch.randn(4, 16), codec).meta["codec"]
    assert named == format_name and Format.of(named).name == named
    assert Format.of(named).bits == codec.bits
    assert encode(torch.arange(3)).meta["codec"] == "raw"  # an integer tensor, as it was


@pytest.mark.parametrize("name", ["int9", "cb1", "fp8", "int", "", None, 4, "INT4"])
def test_a_format_name_no_encoding_writes_is_refused(name):
    assert name not in KNOWN_FORMATS
    with pytest.raises(ValueError, match="is none of"):
        Format.of(name)
