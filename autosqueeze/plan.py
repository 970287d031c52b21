"""A compression plan: the per-layer choices of one trial, as a plain serializable value.

Everything downstream of the search takes a Plan, never an Optuna trial, so a plan can be
written by hand, stored in JSON, and replayed to rebuild exactly the same artifact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

PLAN_FORMAT = 1


@dataclass(frozen=True)
class LayerPlan:
    """What to do to one layer. The defaults leave it untouched."""

    bits: int = 32  # stored weight precision: 2-8 (integer, symmetric), 16 (fp16), 32 (fp32)
    prune: float = 0.0  # fraction of weights zeroed by magnitude
    rank: float = 1.0  # kept fraction of the full rank after SVD; 1.0 = no factorization
    group_size: int | None = None  # weights per quantization scale; None = one per output row
    prune_channels: float = 0.0  # fraction of output channels/neurons removed (structured)
    kernel: str = "fp32"  # execution form once loaded (autosqueeze.kernels)

    def replace(self, **changes: Any) -> LayerPlan:
        return replace(self, **changes)


@dataclass(frozen=True)
class Plan:
    """Layer name (as in ``model.named_modules()``) -> LayerPlan; unnamed layers stay fp32."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "layers": {name: asdict(lp) for name, lp in sorted(self.layers.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """A plan from its dict form, every field checked for its type (a plan may come from
        an untrusted artifact); values a technique cannot take are its own to refuse."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"unsupported plan format {found!r}")
        if not isinstance(data.get("layers"), dict):
            raise ValueError("a plan's layers are not a mapping of layer names")
        types = {f.name: _FIELD_TYPES[f.name] for f in fields(LayerPlan)}
        layers = {}
        for name, values in data["layers"].items():
            if not isinstance(values, dict):
                raise ValueError(f"layer {name!r}: its plan is not a mapping")
            unknown = set(values) - set(types)
            if unknown:
                raise ValueError(f"layer {name!r}: unknown plan fields {sorted(unknown)}")
            for key, value in values.items():
                if type(value) not in types[key]:
                    kind = types[key][0].__name__
                    raise ValueError(f"layer {name!r}: {key} is {value!r}, not a {kind}")
            layers[name] = LayerPlan(**values)
        return cls(layers)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except RecursionError:
            raise ValueError("the plan is nested too deeply to be a plan") from None
        return cls.from_dict(data)

    @classmethod
    def uniform(cls, layer_names: list[str], **choices: Any) -> Plan:
        """The same choice for every named layer, e.g. ``Plan.uniform(names, bits=8)``."""
        return cls({name: LayerPlan(**choices) for name in layer_names})


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bits": (int, float),  # a whole number; 16.0 from a YAML list is 16
    "prune": (float, int),
    "rank": (float, int),
    "group_size": (int, type(None)),
    "prune_channels": (float, int),
    "kernel": (str,),
}
