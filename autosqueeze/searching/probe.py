"""A sensitivity probe: one knob value on one layer (or tied group), and the key the table
stores it under (``encoder.layer.0.bits=4``), written and parsed here alone: the pass,
the knapsack and the dashboard's heatmap all read the stored table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Probe:
    group: str  # a layer, or a tied group of layers: the space's parameter prefix
    knob: str
    value: Any

    @property
    def param(self) -> str:
        return f"{self.group}.{self.knob}"

    @property
    def key(self) -> str:
        """The table's key: ``encoder.layer.0.bits=4``, ``encoder.layer.0.kernel="bf16"``."""
        return f"{self.param}={json.dumps(self.value)}"

    @classmethod
    def of(cls, key: str) -> Probe | None:
        """The probe a table key names (``key``'s one parser); None for ``BASE`` or a key
        that is not a probe's (a study's stored table is read, not trusted)."""
        param, sign, raw = key.partition("=")
        group, dot, knob = param.rpartition(".")
        try:
            return cls(group, knob, json.loads(raw)) if sign and dot else None
        except ValueError:
            return None


BASE = "(base)"
"""The table key of the space's fixed choices alone (usually the original model)."""
