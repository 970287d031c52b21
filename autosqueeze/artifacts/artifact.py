"""The shipped artifact: one safetensors file, no pickle, loadable without running code,
deflated when that makes it smaller.

It holds every tensor of the compressed model in its packed form (``<key>`` for a dense
float tensor; ``<key>::q``, ``::scale``, ``::mask``, ``::values`` for the parts of packed ones)
and, in the safetensors metadata, the plan and each tensor's encoding as JSON. The model's
architecture comes from the user's factory; ``load_artifact`` rebuilds the plan's structure
on it, fills in the decoded weights and converts each layer to the execution form (kernel) the
plan chose, so the loaded model is the one that was measured.

A small model's file is mostly its header (the tensor index, the plan, the encodings: 4.4 of
the 10.5 kB of a 71x digits CNN), text that deflate shrinks 5x; its coded streams barely
shrink. So the file is shipped deflated (``_DEFLATED``: a mark, the safetensors file's length,
its zlib stream) whenever that is smaller, and read back either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as serialize
from torch import nn

from autosqueeze.common.content_cache import ContentCache, content_key
from autosqueeze.compression.codecs import (
    FLOAT_BITS,
    Encoded,
    Format,
    TensorCodec,
    bit_packed,
    check_encoding,
    decode,
    encode,
    encode_quantized,
    integers,
)
from autosqueeze.compression.techniques import (
    TECHNIQUES,
    CompressedModel,
    Rounded,
    Target,
    check_plan,
    deploy,
    rebuild,
)
from autosqueeze.plans.plan import Plan

ARTIFACT_FORMAT = "2"
_TENSORS_ONLY_FORMAT = "1"  # still read: its digest covers the stored tensors only
_SEP = "::"
_DIGEST = "sha256"  # metadata: of every stored tensor and metadata field, so damage is seen
_DEFLATED = b"AQZ\x01"  # then the safetensors file's length (8 bytes, little-endian), deflated
_MAX_INFLATION = 64  # times the deflated file, plus 64 MiB: past it a file is not believed

# What an artifact's header may hold, checked before any of it is parsed: JSON nested
# thousands deep overflows the parser's recursion, and a forged 60 MB metadata field (which
# deflates to 108 kB) costs hundreds of MB to parse. A real header is ~300-500 bytes per
# state-dict key, nested 3 deep: a 1B-parameter model with 200 Linear layers (~500 keys)
# has a 0.26 MB header whose largest field, ``encodings``, is 75 kB. The limits leave 60x
# that (a model of ~30,000 keys), and ten times the nesting.
MAX_HEADER_BYTES = 16 << 20  # the safetensors header: tensor index and metadata
MAX_FIELD_BYTES = 8 << 20  # one metadata field (the plan, the encodings, ...)
MAX_NESTING = 32  # JSON depth of the header and of each metadata field


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over each stored tensor's name, dtype, shape and bytes, in name order, then
    over every metadata field but the digest itself: a changed plan or encoding is damage
    too (format 1 digested the tensors alone)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    if metadata.get("autosqueeze_format") != _TENSORS_ONLY_FORMAT:
        fields = {k: v for k, v in metadata.items() if k != _DIGEST}
        h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


def artifact_bytes(compressed: CompressedModel) -> bytes:
    """The artifact file's exact contents, built in memory: its length is the size on disk,
    and ``load_artifact`` takes it as it would the file (a trial measures it without a disk
    round trip; ``save_artifact`` writes these very bytes)."""
    return _file(*_contents(compressed))


def _file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The file holding ``tensors`` and ``metadata`` (digested), as shipped: the same bytes
    for the same contents every time, so its deflated length is too."""
    return shipped(
        _canonical(serialize(tensors, metadata={**metadata, _DIGEST: _digest(tensors, metadata)}))
    )


def _canonical(stored: bytes) -> bytes:
    """``stored`` with its metadata's keys in sorted order: safetensors writes them in an
    arbitrary order per call, which changes no length but changes what deflate makes of
    the file (and two builds of one plan must be the same file)."""
    length = int.from_bytes(stored[:8], "little")
    header = json.loads(stored[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # escaped otherwise than safetensors escapes (never seen)
        return stored
    return stored[:8] + text.ljust(length) + stored[8 + length :]


def shipped(stored: bytes) -> bytes:
    """The safetensors file ``stored`` as shipped: deflated (zlib, behind ``_DEFLATED`` and
    its length) when that is smaller and inflates within the bound a reader believes, else
    as it is."""
    deflated = _DEFLATED + len(stored).to_bytes(8, "little") + zlib.compress(stored, 9)
    if len(deflated) < len(stored) and len(stored) <= _inflation_bound(len(deflated)):
        return deflated
    return stored


def stored_bytes(source: str | Path | bytes) -> bytes:
    """The safetensors file an artifact holds: the file itself, or what it deflates. A
    deflated file is untrusted: its stream must be whole, inflate to exactly the length it
    states, and state no more than ``_MAX_INFLATION`` times its own size (a small file that
    inflates to gigabytes would exhaust memory); else a ValueError saying which."""
    where: str | Path = "the artifact"
    if isinstance(source, bytes):
        data = source
    else:
        where = _existing(source)
        data = where.read_bytes()
    if not data.startswith(_DEFLATED):
        return data
    head = len(_DEFLATED) + 8
    length = int.from_bytes(data[len(_DEFLATED) : head], "little")
    damage, inflated = None, b""
    if len(data) < head:
        damage = "it is cut short"
    elif length > _inflation_bound(len(data)):
        damage = (
            f"it states {length} bytes inflated from {len(data)} (past the "
            f"{_MAX_INFLATION}x believed)"
        )
    else:
        inflater = zlib.decompressobj()
        try:
            inflated = inflater.decompress(data[head:], length + 1)
        except zlib.error as exc:
            damage = f"its deflated stream is damaged: {exc}"
        else:
            if len(inflated) != length or not inflater.eof or inflater.unused_data:
                damage = (
                    f"its deflated stream is damaged: it inflates to {len(inflated)}"
                    f"{'' if inflater.eof else '+'} bytes, not the {length} it states"
                )
    if damage:
        raise ValueError(f"{where} is not a readable artifact: {damage}")
    return inflated


def _inflation_bound(deflated: int) -> int:
    return _MAX_INFLATION * deflated + (1 << 26)


def bit_packed_bytes(source: str | Path | bytes) -> bytes:
    """The same artifact with no tensor entropy-coded: each Huffman-coded tensor in the smaller
    of its bit-packed layouts (the same levels, so it loads into the same model). Its length
    beside the file's is what entropy coding saved (``evaluate`` prints both). The file is
    checked as loading checks it first: it is untrusted."""
    where = "the artifact" if isinstance(source, bytes) else source
    metadata, tensors = _read(source)
    _checked_contents(metadata, tensors, where)
    encodings = json.loads(metadata["encodings"])
    packed, metas = {}, {}
    for key, parts in _parts(tensors, encodings, where).items():
        encoded = bit_packed(parts, encodings[key])
        metas[key] = encoded.meta
        for part, tensor in encoded.parts.items():
            packed[f"{key}{_SEP}{part}" if part else key] = tensor
    metadata = {k: v for k, v in metadata.items() if k != _DIGEST}
    metadata["encodings"] = json.dumps(metas, sort_keys=True, separators=(",", ":"))
    return _file(packed, metadata)


def artifact_size(compressed: CompressedModel) -> int:
    """The artifact's safetensors file's size in bytes (before ``shipped`` deflates it),
    exactly, without serializing it: the safetensors header
    (JSON, padded to 8 bytes, after its 8-byte length) is laid out as the library lays it
    out, tensors sorted by dtype (widest first) then name, and the data follows."""
    tensors, metadata = _contents(compressed)
    metadata = {**metadata, _DIGEST: "0" * 64}  # a SHA-256 in hex: its length is known
    ordered = sorted(tensors.items(), key=lambda kv: (-_DTYPE_RANK[kv[1].dtype], kv[0]))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in ordered:
        end = offset + tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + -(-len(text) // 8) * 8 + offset


def _contents(compressed: CompressedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    encodings = {}
    state, ties = shared_keys(compressed.module)
    used: set[int] = set()
    for key, value in state.items():
        named = _codec_key(compressed, key, ties)
        if named is None:
            encoded = _encode(value, TensorCodec())
        else:
            codec = compressed.codecs[named]
            chosen = compressed.chosen(named, value, codec)
            encoded = _encode(value, codec) if chosen is None else _encode_chosen(chosen)
        encodings[key] = encoded.meta
        for part, tensor in encoded.parts.items():
            # equal weights (layers deep-copied from one, as nn.TransformerEncoder makes
            # them) share one cached encoding; safetensors stores each name's own bytes
            stored = tensor if id(tensor) not in used else tensor.clone()
            used.add(id(stored))
            tensors[f"{key}{_SEP}{part}" if part else key] = stored
    metadata = {
        "autosqueeze_format": ARTIFACT_FORMAT,
        "plan": compressed.plan.to_json(),
        "encodings": json.dumps(encodings, sort_keys=True, separators=(",", ":")),
    }
    if ties:
        metadata["ties"] = json.dumps(ties, sort_keys=True, separators=(",", ":"))
    return tensors, metadata


def _codec_key(compressed: CompressedModel, key: str, ties: dict[str, str]) -> str | None:
    """The key ``key``'s codec is recorded under: its own, or that of a tensor tied to it
    (None: stored as it is)."""
    if key in compressed.codecs:
        return key
    return next((a for a, owner in ties.items() if owner == key and a in compressed.codecs), None)


def shared_keys(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The module's state with each shared tensor once (under its first key), and the other
    keys of each shared tensor -> that first key. Tied weights (a language model's embedding
    and output head) are one tensor: stored once, tied again at load."""
    state: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    first: dict[int, str] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(value), key)
        if owner == key:
            state[key] = value.detach()
        else:
            ties[key] = owner
    return state, ties


_DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(_DTYPE_NAMES)}  # safetensors' Dtype order


_ENCODINGS: ContentCache[Encoded] = ContentCache(1 << 30, lambda encoded: encoded.nbytes)


def _encode(tensor: torch.Tensor, codec: TensorCodec) -> Encoded:
    """``encode``, reusing the integer encodings of tensors seen before: most layers of most
    trials are base-model weights at a bit-width an earlier trial chose, and quantizing and
    packing them is the bulk of building a large model's artifact. Float storage is a copy,
    cheaper than the key."""
    if codec.bits in FLOAT_BITS or not tensor.is_floating_point():
        return encode(tensor, codec)
    return _ENCODINGS.get((content_key(tensor), codec), lambda: encode(tensor, codec))


def _encode_chosen(chosen: Rounded) -> Encoded:
    """``encode_quantized`` of the integers a rounding chose, reused as ``_encode`` reuses."""
    key = (content_key(chosen.q), content_key(chosen.scale), chosen.codec)
    return _ENCODINGS.get(key, lambda: encode_quantized(chosen.q, chosen.scale, chosen.codec))


def save_artifact(compressed: CompressedModel | bytes, path: str | Path) -> int:
    """Write the artifact (a compressed model, or its ``artifact_bytes``); returns its size
    on disk in bytes."""
    data = compressed if isinstance(compressed, bytes) else artifact_bytes(compressed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # a reader never sees half a file
    return path.stat().st_size


def read_plan(source: str | Path | bytes) -> Plan:
    """The plan an artifact (its file or bytes) was made from, read from its header;
    ValueError when it is not an artifact or its plan is malformed."""
    where = "the artifact" if isinstance(source, bytes) else source
    try:
        plan = Plan.from_json(_read_metadata(source)["plan"])
        check_plan(plan)
    except (SafetensorError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} is not a readable autosqueeze artifact: {exc}") from None
    return plan


def load_artifact(
    source: str | Path | bytes,
    model: nn.Module,
    target: Target | None = None,
    *,
    execution_form: bool = True,
) -> nn.Module:
    """Load an artifact (a file, or its bytes) into ``model`` (a fresh instance from the
    factory; changed in place) and return it on ``target``'s device in its execution form
    (or, without ``execution_form``, as torch's own layers holding the decoded weights: what
    a format with kernels of its own starts from). A plan with structured pruning needs
    ``target.example_input`` to trace the model."""
    target = target or Target()
    where = "the artifact" if isinstance(source, bytes) else source
    metadata, tensors = _read(source)
    plan, state = _checked_contents(metadata, tensors, where)
    ties = _ties(metadata, state, source)
    _check_can_rebuild(plan, model, target, where)
    try:
        rebuild(model, plan, target)
        # the metadata is not digested: a forged tie could load one tensor in another's place
        if ties != shared_keys(model)[1]:
            raise ValueError("its tied tensors are not the ones this model shares")
        for alias, owner in ties.items():
            state[alias] = state[owner]
        expected = model.state_dict()
        for key, tensor in state.items():
            held = expected.get(key)
            if held is not None and held.is_floating_point() != tensor.is_floating_point():
                raise ValueError(f"{key} is stored as {tensor.dtype}, the model holds {held.dtype}")
        load_state(model, state)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{where} does not fit this model: {str(exc).splitlines()[0]}") from None
    model = model.eval().to(target.device)
    return deploy(model, plan) if execution_form else model


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)`` for a state read from a file that keeps
    no module versions (safetensors): the model's own versions go with it, as a state dict
    it made would carry them. Some modules refuse a state without them (torchvision's
    MNASNet: "version should be set to 1 or 2")."""
    if getattr(state, "_metadata", None) is None:
        state = OrderedDict(state)
        state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def _check_can_rebuild(plan: Plan, model: nn.Module, target: Target, where: object) -> None:
    """What loading a plan that reshapes coupled layers through the model's graph needs
    beyond the model itself, named before anything is changed: an example input to trace
    the model with, and Torch-Pruning to trace it."""
    reshaping = sorted(
        {
            name
            for name, lp in plan.layers.items()
            for t in TECHNIQUES.values()
            if getattr(lp, t.knob) != t.identity and t.needs_graph(model, name)
        }
    )
    if not reshaping:
        return
    if target.example_input is None:
        raise ValueError(
            f"{where}: its plan removes channels or heads ({', '.join(reshaping[:3])}"
            f"{', ...' if len(reshaping) > 3 else ''}), so loading it traces the model: pass an "
            "input the model takes, load_artifact(path, model, Target(device, example_input))"
        )
    import importlib.util

    if importlib.util.find_spec("torch_pruning") is None:
        raise ValueError(
            f"{where}: its plan removes channels or heads, and loading it needs Torch-Pruning "
            "to trace the model: pip install torch-pruning"
        )


def stored_integers(
    source: str | Path | bytes,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int | None]]:
    """Per state-dict key stored as integers: its values (int8-held, the tensor's shape), its
    fp16 scales (rows, groups) and its group size, exactly as the artifact holds them (the
    file checked first, as ``load_artifact`` does)."""
    metadata, tensors = _read(source)
    where = "the artifact" if isinstance(source, bytes) else source
    _checked_contents(metadata, tensors, where)
    encodings = json.loads(metadata["encodings"])
    parts = _parts(tensors, encodings, where)
    return {
        key: (*integers(parts[key], meta), meta["group_size"])
        for key, meta in encodings.items()
        if Format.of(meta["codec"]).kind == "int"
    }


def _checked_contents(
    metadata: dict[str, str], tensors: dict[str, torch.Tensor], where: object
) -> tuple[Plan, dict[str, torch.Tensor]]:
    """The plan and the decoded state of an artifact whose every part was checked against
    what its metadata says before anything is decoded (the file is untrusted)."""
    try:
        plan = Plan.from_json(metadata["plan"])
        check_plan(plan)
        encodings = json.loads(metadata["encodings"])
        if not isinstance(encodings, dict):
            raise ValueError("its encodings are not a mapping")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: its plan or encodings are malformed: {exc}") from None
    if metadata.get(_DIGEST) != _digest(tensors, metadata):  # a renamed or dropped one too
        raise ValueError(
            f"{where}: its contents do not match their SHA-256, or it has none (damaged in "
            "transit?)"
        )
    parts = _parts(tensors, encodings, where)
    state = {}
    for key, meta in encodings.items():
        try:
            check_encoding(parts[key], meta)
            state[key] = _decode(parts[key], meta)
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: tensor {key!r} is malformed: {exc}") from None
    return plan, state


def _parts(
    tensors: dict[str, torch.Tensor], encodings: dict[str, Any], where: object
) -> dict[str, dict[str, torch.Tensor]]:
    """The stored tensors by the state-dict key they encode (``<key>::<part>``)."""
    parts: dict[str, dict[str, torch.Tensor]] = {key: {} for key in encodings}
    for name, tensor in tensors.items():
        key, _, part = name.partition(_SEP)
        if key not in parts:
            raise ValueError(f"{where}: tensor {name!r} is not described by its encodings")
        parts[key][part] = tensor
    return parts


def _ties(
    metadata: dict[str, str], encodings: Mapping[str, object], where: object
) -> dict[str, str]:
    try:
        ties = json.loads(metadata.get("ties", "{}"))
        if all(isinstance(a, str) and owner in encodings for a, owner in ties.items()):
            return ties
    except (json.JSONDecodeError, TypeError, AttributeError):
        pass
    where = "the artifact" if isinstance(where, bytes) else where
    raise ValueError(f"{where}: its list of tied tensors is malformed")


_DECODED: ContentCache[torch.Tensor] = ContentCache(
    1 << 30, lambda tensor: tensor.numel() * tensor.element_size()
)


def _decode(parts: dict[str, torch.Tensor], meta: dict[str, object]) -> torch.Tensor:
    """``decode``, reusing the result for stored bytes seen before (keyed by those bytes and
    their encoding, so it is the tensor decoding them again would give)."""
    if Format.of(meta["codec"]).kind != "int":
        return decode(parts, meta)
    key = (
        json.dumps(meta, sort_keys=True),
        *(name.encode() + content_key(tensor) for name, tensor in sorted(parts.items())),
    )
    return _DECODED.get(key, lambda: decode(parts, meta))


def _read_metadata(source: str | Path | bytes) -> dict[str, str]:
    """An artifact's metadata, from its header alone (of a deflated one, only as much of
    the stream as the header takes is inflated: a trial reads the plan, then loads)."""
    if not isinstance(source, bytes) and not _is_deflated(_existing(source)):
        with safe_open(source, framework="pt") as f:
            return _metadata(f, source)
    where = "the artifact" if isinstance(source, bytes) else source
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return _header_metadata(_stored_header(data, where), where)


def _header_metadata(data: bytes, where: object) -> dict[str, str]:
    """The metadata in a stored file's header (``data``: the file, or its first bytes through
    the header), the header bounded before it is parsed."""
    length = _header_length(data, where)
    if length > len(data) - 8:
        raise ValueError(f"{where} is not a readable safetensors file: its header is cut short")
    text = data[8 : 8 + length]
    _check_nesting(text, "its header", where)
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not a readable safetensors file: {exc}") from None
    return _checked(header.get("__metadata__") if isinstance(header, dict) else None, where)


def _header_length(data: bytes, where: object) -> int:
    """The header length a stored file states in its first 8 bytes, within
    ``MAX_HEADER_BYTES``."""
    if len(data) < 8:
        raise ValueError(f"{where} is not a readable safetensors file: its header is cut short")
    length = int.from_bytes(data[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise ValueError(
            f"{where} is not a readable artifact: its header states {length:,} bytes; the "
            f"limit is {MAX_HEADER_BYTES:,}"
        )
    return length


def _stored_header(data: bytes, where: object) -> bytes:
    """The stored file's first bytes, through its safetensors header: all of ``data`` when
    it is not deflated, else no more of its stream inflated than the header takes (and than
    the length it states)."""
    if not data.startswith(_DEFLATED):
        return data
    head = len(_DEFLATED) + 8
    stated = int.from_bytes(data[len(_DEFLATED) : head], "little")
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data[head:], 8)
        need = min(8 + _header_length(out, where), stated, _inflation_bound(len(data)))
        while len(out) < need and inflater.unconsumed_tail:
            out += inflater.decompress(inflater.unconsumed_tail, need - len(out))
    except zlib.error as exc:
        raise ValueError(
            f"{where} is not a readable artifact: its deflated stream is damaged: {exc}"
        ) from None
    return out


def _is_deflated(path: Path) -> bool:
    """Whether the file is deflated; if not, the header length it states is checked, as
    safetensors reads the whole header before anything else."""
    with path.open("rb") as f:
        prefix = f.read(8)
    if prefix.startswith(_DEFLATED):
        return True
    _header_length(prefix, path)
    return False


def _read(source: str | Path | bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """An artifact's metadata and stored tensors, from its file or its bytes (inflated when
    deflated); anything that is not a readable safetensors file is a ValueError saying so."""
    where = "the artifact" if isinstance(source, bytes) else _existing(source)
    try:
        if isinstance(where, str) or _is_deflated(where):  # a str: ``source`` is the bytes
            data = stored_bytes(source)
            return _header_metadata(data, where), load_tensors(data)
        with safe_open(where, framework="pt") as f:
            metadata = _metadata(f, where)
            return metadata, {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{where} is not a readable safetensors file: {exc}") from None


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"artifact {path} {what}")
    return path


def _metadata(handle: object, path: str | Path) -> dict[str, str]:
    return _checked(handle.metadata(), path)  # type: ignore[attr-defined]


def _checked(metadata: object, where: object) -> dict[str, str]:
    """An artifact's metadata: text fields, each within ``MAX_FIELD_BYTES`` and
    ``MAX_NESTING`` before any of them is parsed (the plan, the encodings and the ties are
    JSON)."""
    if not isinstance(metadata, dict) or metadata.get("autosqueeze_format") not in (
        ARTIFACT_FORMAT,
        _TENSORS_ONLY_FORMAT,
    ):
        raise ValueError(f"{where} is not an autosqueeze artifact (format {ARTIFACT_FORMAT})")
    for name, text in metadata.items():
        field = f"metadata field {name[:40]!r}"
        if not isinstance(text, str):
            raise ValueError(f"{where}: its {field} is not text")
        raw = text.encode()
        if len(raw) > MAX_FIELD_BYTES:
            raise ValueError(
                f"{where}: its {field} is {len(raw):,} bytes; the limit is {MAX_FIELD_BYTES:,}"
            )
        _check_nesting(raw, f"its {field}", where)
    return metadata


# a JSON string, one left open running to the end: each match consumes what it scanned, so
# the scan stays linear on hostile text
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as int8: +1 opens, -1 closes
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _check_nesting(text: bytes, what: str, where: object) -> None:
    """Refuse JSON ``text`` nested past ``MAX_NESTING``: its brackets outside strings,
    counted in linear time without a parser (deep nesting is what overflows one)."""
    steps = bytearray(_JSON_STRING.sub(b"", text).translate(_STEPS, _NOT_BRACKETS))
    if not steps:
        return
    depth = int(torch.frombuffer(steps, dtype=torch.int8).cumsum(0, dtype=torch.int32).max())
    if depth > MAX_NESTING:
        raise ValueError(f"{where}: {what} nests {depth:,} deep; the limit is {MAX_NESTING}")
