"""An artifact is untrusted: every corrupt or forged variant of a real one is refused by
``evaluate`` with exit 2 and a message naming the file, never a traceback or a wrong answer.
A forger can recompute the SHA-256 (it is a check against damage, not a signature), so the
forged metadata below carries a digest that matches it: the checks of the metadata against
the tensors and the model are what refuse it."""

from __future__ import annotations

import json
import os
import re
import struct
import zlib

import pytest
import torch
from conftest import study_config, write_yaml
from safetensors.torch import load as load_tensors
from torch import nn

from autosqueeze.artifacts.artifact import (
    _DEFLATED,
    MAX_FIELD_BYTES,
    MAX_HEADER_BYTES,
    MAX_NESTING,
    _digest,
    save_artifact,
    stored_bytes,
)
from autosqueeze.cli import main
from autosqueeze.compression.techniques import compress
from autosqueeze.examples.digits import pretrained_cnn
from autosqueeze.plans.plan import Plan


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    model = pretrained_cnn()
    names = [n for n, m in model.named_modules() if type(m).__name__ in ("Conv2d", "Linear")]
    path = folder / "good.safetensors"
    save_artifact(compress(model, Plan.uniform(names, bits=4, prune=0.5)), path)
    assert path.read_bytes().startswith(_DEFLATED)  # shipped deflated
    return stored_bytes(path)  # the safetensors file in it: what a forger edits


DEEP = "[" * 20_000 + "]" * 20_000


def _deflated(data: bytes, stated: int | None = None) -> bytes:
    length = len(data) if stated is None else stated
    return _DEFLATED + length.to_bytes(8, "little") + zlib.compress(data)


def _variants(data: bytes, padding: int = MAX_FIELD_BYTES) -> dict[str, bytes]:
    """Forged and damaged copies of ``data`` (the safetensors file an artifact holds) by what
    was done to them; one field is padded with ``padding`` spaces, past its limit
    (benchmarks/reliability.py pads it with the 60 MB of issue 35)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])

    def with_header(h: dict, extra: bytes = b"") -> bytes:
        text = json.dumps(h).encode()
        if extra:  # JSON too deep for json.dumps to write
            text = text[:-1] + b', "extra": ' + extra + b"}"
        return (
            struct.pack("<Q", len(text) + -len(text) % 8)
            + text
            + b" " * (-len(text) % 8)
            + data[8 + n :]
        )

    def changed(**metadata: str) -> bytes:
        forged = {**header["__metadata__"], **metadata}
        forged["sha256"] = _digest(load_tensors(data), forged)  # as a forger would
        return with_header({**header, "__metadata__": forged})

    def damaged(**metadata: str) -> bytes:  # the digest left as it was
        return with_header({**header, "__metadata__": {**header["__metadata__"], **metadata}})

    plan = json.loads(header["__metadata__"]["plan"])
    layer = next(iter(plan["layers"]))
    encodings = json.loads(header["__metadata__"]["encodings"])
    weight = f"{layer}.weight"

    def planned(**values: object) -> bytes:
        layers = {**plan["layers"], layer: {**plan["layers"][layer], **values}}
        return changed(plan=json.dumps({**plan, "layers": layers}))

    def encoded(**values: object) -> bytes:
        return changed(encodings=json.dumps({**encodings, weight: {**encodings[weight], **values}}))

    tensor = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    relabelled = json.loads(json.dumps(header))
    relabelled[tensor]["dtype"] = "I32"
    giant = json.loads(json.dumps(header))
    giant[tensor]["shape"] = [1 << 40, 1 << 20]
    flipped = bytearray(data)
    flipped[-100] ^= 0x10  # one bit of a stored weight
    return {
        "a payload bit flipped": bytes(flipped),
        "a plan value changed": damaged(
            plan=json.dumps(
                {**plan, "layers": {**plan["layers"], layer: {**plan["layers"][layer], "bits": 5}}}
            )
        ),
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "random": os.urandom(4096),
        "header length 2^62": struct.pack("<Q", 1 << 62) + data[8:],
        "header past the end": struct.pack("<Q", len(data)) + data[8:],
        "giant shape": with_header(giant),
        "F32 relabelled I32": with_header(relabelled),
        "not an autosqueeze artifact": changed(autosqueeze_format="0"),
        "bits 'eight'": planned(bits="eight"),
        "bits 1": planned(bits=1),
        "unknown kernel": planned(kernel="warp9"),
        "negative prune": planned(prune=-0.5),
        "layers a list": changed(plan=json.dumps({**plan, "layers": [1, 2]})),
        "plan nested 20,000 deep": changed(plan="[" * 20000 + "]" * 20000),
        "plan not JSON": changed(plan="{bits: 4"),
        "encodings nested 20,000 deep": changed(encodings=DEEP),
        "deflated, encodings nested 20,000 deep": _deflated(changed(encodings=DEEP)),
        "ties nested 20,000 deep": changed(ties=DEEP),
        "a field of its own nested 20,000 deep": changed(extra=DEEP),
        "the header nested 20,000 deep": with_header(header, DEEP.encode()),
        "deflated, the header nested 20,000 deep": _deflated(with_header(header, DEEP.encode())),
        "a metadata field a mapping, not text": with_header(
            {**header, "__metadata__": {**header["__metadata__"], "plan": plan}}
        ),
        "deflated, a metadata field a mapping": _deflated(
            with_header({**header, "__metadata__": {**header["__metadata__"], "plan": plan}})
        ),
        # a field of megabytes of spaces deflates to kilobytes
        "deflated, encodings past the field limit": _deflated(
            changed(encodings=json.dumps(encodings) + " " * padding)
        ),
        "deflated, a header past its limit": _deflated(
            changed(**{f"pad{i}": " " * (MAX_FIELD_BYTES - 1) for i in range(3)})
        ),
        "header length just past the limit": struct.pack("<Q", MAX_HEADER_BYTES + 8) + data[8:],
        "codec int99": encoded(codec="int99"),
        "count beyond the shape": encoded(count=1 << 40),
        "shape of a terabyte": encoded(shape=[1 << 40]),
        "a part missing": changed(
            encodings=json.dumps({k: v for k, v in encodings.items() if k != weight})
        ),
        "ties to nothing": changed(ties=json.dumps({"x": "nowhere"})),
        # same shape (64,): only the model can say no
        "one bias tied in another's place": changed(
            ties=json.dumps({"features.5.bias": "features.2.bias"})
        ),
        # the shipped form: deflated
        "deflated, a payload bit flipped": _deflated(bytes(flipped)),
        "deflated, the stream cut short": _deflated(data)[:-50],
        "deflated, the stream damaged": _deflated(data)[:40] + b"\x00" * 40 + _deflated(data)[80:],
        "deflated, trailing bytes": _deflated(data) + b"more",
        "deflated, a length stated short": _deflated(data, len(data) - 1),
        "deflated, a length stated long": _deflated(data, len(data) + 1),
        "deflated, only the mark": _DEFLATED,
        "deflated, 64 MiB of zeros in 64 kB (a bomb)": _deflated(
            bytes(1 << 26) + data, stated=1 << 40
        ),
        "deflated random bytes": _deflated(os.urandom(4096)),
    }


def test_every_forged_or_corrupt_artifact_exits_2_naming_the_file(tmp_path, artifact, capsys):
    config = write_yaml(tmp_path / "study.yaml", study_config(tmp_path))
    good = tmp_path / "good.safetensors"
    good.write_bytes(artifact)
    assert main(["evaluate", str(config), "--artifact", str(good)]) == 0
    capsys.readouterr()
    outcomes = {}
    for name, data in _variants(artifact).items():
        path = tmp_path / "forged.safetensors"
        path.write_bytes(data)
        code = main(["evaluate", str(config), "--artifact", str(path)])
        err = capsys.readouterr().err
        outcomes[name] = (code, "Traceback" not in err and str(path) in err)
    assert outcomes == {name: (2, True) for name in outcomes}
    folder = tmp_path / "a-folder.safetensors"
    folder.mkdir()
    fifo = tmp_path / "a-fifo.safetensors"
    os.mkfifo(fifo)  # opening it would block: it must never be opened
    endless = tmp_path / "endless.safetensors"
    endless.symlink_to("/dev/zero")
    for odd in (folder, fifo, endless):
        assert main(["evaluate", str(config), "--artifact", str(odd)]) == 2
        assert f"{odd} is not a regular file" in capsys.readouterr().err


def test_an_artifact_whose_digest_key_is_renamed_is_refused(tmp_path):
    """Found by the fuzz test: one flipped bit turned "sha256" into "rha256", and an
    artifact without its digest used to load unchecked."""
    from autosqueeze.artifacts.artifact import load_artifact, save_artifact
    from autosqueeze.compression.techniques import compress
    from autosqueeze.examples.digits import pretrained_cnn
    from autosqueeze.plans.plan import Plan

    path = tmp_path / "m.safetensors"
    save_artifact(compress(pretrained_cnn(), Plan.uniform(["classifier.1"], bits=4)), path)
    data = stored_bytes(path)
    assert b'"sha256"' in data
    path.write_bytes(data.replace(b'"sha256"', b'"rha256"', 1))
    with pytest.raises(ValueError, match="SHA-256"):
        load_artifact(path, pretrained_cnn())


def test_an_artifact_of_the_first_format_still_loads(tmp_path, artifact):
    """Format 1 digested the tensors alone; a front saved by it must still load."""
    from autosqueeze.artifacts.artifact import load_artifact

    n = struct.unpack("<Q", artifact[:8])[0]
    header = json.loads(artifact[8 : 8 + n])
    metadata = {**header["__metadata__"], "autosqueeze_format": "1"}
    metadata["sha256"] = _digest(load_tensors(artifact), metadata)
    text = json.dumps({**header, "__metadata__": metadata}).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "old.safetensors").write_bytes(
        struct.pack("<Q", len(text)) + text + artifact[8 + n :]
    )
    old = load_artifact(tmp_path / "old.safetensors", pretrained_cnn())
    new = load_artifact(artifact, pretrained_cnn())
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_metadata_is_bounded_before_it_is_parsed_and_each_refusal_names_its_limit(artifact):
    from autosqueeze.artifacts.artifact import load_artifact, read_plan

    variants = _variants(artifact)
    nesting = f"deep; the limit is {MAX_NESTING}"
    expected = {
        "encodings nested 20,000 deep": f"'encodings' nests 20,000 {nesting}",
        "deflated, the header nested 20,000 deep": f"its header nests 20,001 {nesting}",
        "deflated, encodings past the field limit": f"bytes; the limit is {MAX_FIELD_BYTES:,}",
        "deflated, a header past its limit": f"bytes; the limit is {MAX_HEADER_BYTES:,}",
    }
    for name, message in expected.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            load_artifact(variants[name], pretrained_cnn())
    with pytest.raises(ValueError, match=f"'plan' nests 20,000 deep; the limit is {MAX_NESTING}"):
        read_plan(variants["plan nested 20,000 deep"])


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        self.self_attn = nn.ModuleDict({n: nn.Linear(width, width) for n in names})
        names = ("gate_proj", "up_proj", "down_proj")
        self.mlp = nn.ModuleDict({n: nn.Linear(width, width) for n in names})
        self.input_layernorm = nn.LayerNorm(width)
        self.post_attention_layernorm = nn.LayerNorm(width)


class _Decoder(nn.Module):
    """A 1B-parameter decoder's layout (28 blocks, 197 Linear layers, 507 state-dict keys) at
    a tiny width: the header grows with the names and the count of tensors, not their size."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(100, width)
        self.model.layers = nn.ModuleList([_Block(width) for _ in range(28)])
        self.lm_head = nn.Linear(width, 100)


def test_the_limits_leave_room_for_a_model_of_200_layers():
    from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact

    model = _Decoder()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = Plan.uniform(names, bits=4, prune=0.5, rank=0.5)
    data = artifact_bytes(compress(model, plan))
    stored = stored_bytes(data)
    length = struct.unpack("<Q", stored[:8])[0]
    metadata = json.loads(stored[8 : 8 + length])["__metadata__"]
    assert length * 30 < MAX_HEADER_BYTES
    assert max(len(field) for field in metadata.values()) * 30 < MAX_FIELD_BYTES
    load_artifact(data, _Decoder())
