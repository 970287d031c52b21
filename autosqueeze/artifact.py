"""The shipped artifact: one safetensors file, no pickle, loadable without running code.

It holds every tensor of the compressed model in its packed form (``<key>`` for a dense
float tensor; ``<key>::q``, ``::scale``, ``::mask``, ``::values`` for the parts of packed ones)
and, in the safetensors metadata, the plan and each tensor's encoding as JSON. The model's
architecture comes from the user's factory; ``load_artifact`` rebuilds the plan's structure
on it, fills in the decoded weights and converts each layer to the execution form (kernel) the
plan chose, so the loaded model is the one that was measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from autosqueeze.codecs import TensorCodec, decode, encode
from autosqueeze.plan import Plan
from autosqueeze.techniques import CompressedModel, Target, deploy, rebuild

ARTIFACT_FORMAT = "1"
_SEP = "::"


def save_artifact(compressed: CompressedModel, path: str | Path) -> int:
    """Write the artifact; returns its size on disk in bytes."""
    path = Path(path)
    tensors = {}
    encodings = {}
    for key, value in compressed.module.state_dict().items():
        encoded = encode(value, compressed.codecs.get(key, TensorCodec()))
        encodings[key] = encoded.meta
        for part, tensor in encoded.parts.items():
            tensors[f"{key}{_SEP}{part}" if part else key] = tensor
    metadata = {
        "autosqueeze_format": ARTIFACT_FORMAT,
        "plan": compressed.plan.to_json(),
        "encodings": json.dumps(encodings, sort_keys=True, separators=(",", ":")),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)  # a reader never sees half a file
    return path.stat().st_size


def read_plan(path: str | Path) -> Plan:
    """The plan an artifact was made from (reads only the header)."""
    with safe_open(_existing(path), framework="pt") as f:
        return Plan.from_json(_metadata(f, path)["plan"])


def load_artifact(path: str | Path, model: nn.Module, target: Target | None = None) -> nn.Module:
    """Load an artifact into ``model`` (a fresh instance from the factory; changed in place)
    and return it on ``target``'s device in its execution form. A plan with structured pruning
    needs ``target.example_input`` to trace the model."""
    target = target or Target()
    path = _existing(path)
    with safe_open(path, framework="pt") as f:
        metadata = _metadata(f, path)
        encodings = json.loads(metadata["encodings"])
        parts: dict[str, dict[str, object]] = {key: {} for key in encodings}
        for name in f.keys():
            key, _, part = name.partition(_SEP)
            parts[key][part] = f.get_tensor(name)
    plan = Plan.from_json(metadata["plan"])
    state = {key: decode(parts[key], meta) for key, meta in encodings.items()}
    try:
        rebuild(model, plan, target)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} does not fit this model: {str(exc).splitlines()[0]}") from None
    return deploy(model.eval().to(target.device), plan)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {path} does not exist")
    return path


def _metadata(handle: object, path: str | Path) -> dict[str, str]:
    metadata = handle.metadata() or {}  # type: ignore[attr-defined]
    if metadata.get("autosqueeze_format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path} is not an autosqueeze artifact (format {ARTIFACT_FORMAT})")
    return metadata
