"""A compression plan: the per-layer choices of one trial, as a plain serializable value.

Everything downstream of the search takes a Plan, never an Optuna trial, so a plan can be
written by hand, stored in JSON, and replayed to rebuild exactly the same artifact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from autosqueeze.plans.knob_facts import DEFAULTS, TECHNIQUES, TYPES

PLAN_FORMAT = 1


@dataclass(frozen=True, init=False, eq=False)
class LayerPlan:
    """What to do to one layer: a value for each knob it changes, and for the settings its
    techniques read beside them; every other reads as its default, which leaves the layer
    untouched. The knobs and settings are the techniques' (``knob_facts``: those of the
    package and those ``techniques.register`` adds), read as attributes: ``layer_plan.bits``,
    ``layer_plan.group_size``."""

    values: dict[str, Any]  # as given, defaults included

    def __init__(self, **values: Any) -> None:
        for name in values:
            _check_known(name)
        object.__setattr__(self, "values", values)

    @classmethod
    def _read(cls, values: dict[str, Any]) -> LayerPlan:
        """A stored layer plan, knobs this process does not know included (a reader without
        a user's module still reads the study; ``techniques.check_plan`` refuses them)."""
        plan = object.__new__(cls)
        object.__setattr__(plan, "values", dict(values))
        return plan

    def __getattr__(self, name: str) -> Any:
        """A knob's or setting's value here, else its default (a technique's identity)."""
        if name.startswith("__"):
            raise AttributeError(name)
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name in DEFAULTS:
            return DEFAULTS[name]
        if name in TECHNIQUES:
            return TECHNIQUES[name].identity
        raise AttributeError(f"{type(self).__name__} has no knob {name!r}")

    @classmethod
    def of(cls, **values: Any) -> LayerPlan:
        """A layer plan from knob values, the package's and any registered technique's."""
        return cls(**values)

    def replace(self, **changes: Any) -> LayerPlan:
        return LayerPlan._read({**self.values, **LayerPlan(**changes).values})

    @property
    def extra(self) -> dict[str, Any]:
        """The knobs of techniques registered from outside the package (or unknown here)."""
        return {k: v for k, v in self.values.items() if k not in DEFAULTS}

    def to_dict(self) -> dict[str, Any]:
        """The values this plan sets, by name, less the package's knobs and settings at their
        defaults: an artifact's header carries the plan, and on a small model every byte of
        it counts. A registered technique's are all kept: a reader without its module then
        refuses the plan instead of reading it as another."""
        return {
            k: v for k, v in sorted(self.values.items()) if k not in DEFAULTS or v != DEFAULTS[k]
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerPlan) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({shown})"


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
                if key not in TYPES and not _KNOB_NAME.fullmatch(str(key)):
                    raise ValueError(f"layer {name!r}: {str(key)[:80]!r} is not a knob name")
                types = TYPES.get(key, _EXTRA_TYPES)
                if type(value) not in types:
                    kind = types[0].__name__
                    raise ValueError(f"layer {name!r}: {key} is {value!r}, not a {kind}")
            layers[name] = LayerPlan._read(values)  # its technique checks it when used
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


_EXTRA_TYPES: tuple[type, ...] = (float, int, str)  # a registered technique's: number or name
_KNOB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_BASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")  # as config's model.candidates


def _check_known(name: str) -> None:
    """Raise ValueError unless ``name`` is a knob or setting of the package or a registered
    technique's knob."""
    if name not in DEFAULTS and name not in TECHNIQUES:
        raise ValueError(f"unknown knob {name!r}; the knobs are {', '.join(TECHNIQUES)}")
