"""A compression plan: the per-layer choices of one trial, as a plain serializable value.

Everything downstream of the search takes a Plan, never an Optuna trial, so a plan can be
written by hand, stored in JSON, and replayed to rebuild exactly the same artifact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

PLAN_FORMAT = 1


@dataclass(frozen=True)
class LayerPlan:
    """What to do to one layer. The defaults leave it untouched."""

    bits: int = 32  # stored weight precision: 2-8 (integer, symmetric), 16 (fp16), 32 (fp32)
    prune: float = 0.0  # fraction of weights zeroed, chosen by ``prune_by``
    rank: float = 1.0  # kept fraction of the full rank after SVD; 1.0 = no factorization
    group_size: int | None = None  # weights per quantization scale; None = one per output row
    prune_channels: float = 0.0  # fraction of output channels/neurons removed (structured)
    prune_heads: float = 0.0  # fraction of an attention block's heads removed (structured)
    kernel: str = "fp32"  # execution form once loaded (autosqueeze.kernels)
    cluster: int = 0  # 2**cluster shared values (k-means codebook) instead of bits; 0 = off
    prune_by: str = "magnitude"  # or "activation" (|w| x its input's norm, Wanda), "hessian"
    separable: int = 0  # depthwise filters per input channel of a k x k conv made separable
    cluster_rows: int | None = None  # rows sharing one codebook under cluster; None = all
    # the knobs of techniques registered from outside the package (``techniques.register``);
    # read as attributes like the fields above, stored beside them in the plan's JSON
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __getattr__(self, name: str) -> Any:
        """A registered technique's knob: its value here, else its identity."""
        if name.startswith("__"):
            raise AttributeError(name)
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        from autosqueeze.techniques import TECHNIQUES

        if name in TECHNIQUES:
            return TECHNIQUES[name].identity
        raise AttributeError(f"{type(self).__name__} has no knob {name!r}")

    @classmethod
    def of(cls, **values: Any) -> LayerPlan:
        """A layer plan from knob values, the fields' and any registered technique's."""
        own = {k: v for k, v in values.items() if k in _FIELD_TYPES}
        return cls(**own, extra=_registered({k: v for k, v in values.items() if k not in own}))

    def replace(self, **changes: Any) -> LayerPlan:
        own = {k: v for k, v in changes.items() if k in _FIELD_TYPES}
        extra = _registered({k: v for k, v in changes.items() if k not in own})
        if extra:
            own["extra"] = {**self.extra, **extra}
        return replace(self, **own)

    def to_dict(self) -> dict[str, Any]:
        """The knobs this plan changes from their defaults, the registered techniques' beside
        the fields' (the rest read back as their defaults): an artifact's header carries the
        plan, and on a small model every byte of it counts."""
        own = {
            f.name: value
            for f in fields(self)
            if f.name != "extra" and (value := getattr(self, f.name)) != f.default
        }
        return {**own, **dict(sorted(self.extra.items()))}


@dataclass(frozen=True)
class Plan:
    """Layer name (as in ``model.named_modules()``) -> LayerPlan; unnamed layers stay fp32."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    # the model compressed: "" the original, else a distilled student named in
    # ``model.candidates`` (whose layers the plan names)
    base: str = ""

    def to_dict(self) -> dict[str, Any]:
        layers = {name: lp.to_dict() for name, lp in sorted(self.layers.items())}
        base = {"base": self.base} if self.base else {}
        return {"format": PLAN_FORMAT, **base, "layers": layers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """A plan from its dict form, every field checked for its type (a plan may come from
        an untrusted artifact); values a technique cannot take, and knobs no registered
        technique has, are refused where the plan is used (``techniques.check_plan``), so
        a reader without the user's module still reads the study."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"unsupported plan format {found!r}")
        if not isinstance(data.get("layers"), dict):
            raise ValueError("a plan's layers are not a mapping of layer names")
        base = data.get("base", "")
        if not isinstance(base, str) or (base and not _BASE_NAME.fullmatch(base)):
            raise ValueError(f"a plan's base {str(base)[:80]!r} is not a candidate's name")
        layers = {}
        for name, values in data["layers"].items():
            if not isinstance(values, dict):
                raise ValueError(f"layer {name!r}: its plan is not a mapping")
            for key, value in values.items():
                if key not in _FIELD_TYPES and not _KNOB_NAME.fullmatch(str(key)):
                    raise ValueError(f"layer {name!r}: {str(key)[:80]!r} is not a knob name")
                types = _FIELD_TYPES.get(key, _EXTRA_TYPES)
                if type(value) not in types:
                    kind = types[0].__name__
                    raise ValueError(f"layer {name!r}: {key} is {value!r}, not a {kind}")
            own = {k: v for k, v in values.items() if k in _FIELD_TYPES}
            extra = {k: v for k, v in values.items() if k not in own}
            layers[name] = LayerPlan(**own, extra=extra)  # its technique checks it when used
        return cls(layers, base)

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
        return cls({name: LayerPlan.of(**choices) for name in layer_names})


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bits": (int, float),  # a whole number; 16.0 from a YAML list is 16
    "prune": (float, int),
    "rank": (float, int),
    "group_size": (int, type(None)),
    "prune_channels": (float, int),
    "prune_heads": (float, int),
    "kernel": (str,),
    "cluster": (int, float),  # a whole number, as bits
    "prune_by": (str,),
    "separable": (int, float),  # a whole number, as bits
    "cluster_rows": (int, type(None)),
}
_EXTRA_TYPES: tuple[type, ...] = (float, int, str)  # a registered technique's: number or name
_KNOB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_BASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")  # as config's model.candidates


def _registered(values: dict[str, Any]) -> dict[str, Any]:
    """``values``, each the knob of a registered technique (else a ValueError naming it)."""
    if values:
        from autosqueeze.techniques import technique_for

        for knob in values:
            technique_for(knob)
    return values
