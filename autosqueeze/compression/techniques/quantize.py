"""Weight quantization: each weight of a layer is stored at the plan's bit-width.

Applying it only records a TensorCodec per weight; the artifact writer quantizes and packs,
and the model evaluated is the one loaded back from those packed bytes.
"""

from __future__ import annotations

from typing import Any

from autosqueeze.compression.codecs import SUPPORTED_BITS, TensorCodec
from autosqueeze.compression.techniques.base import (
    CompressedModel,
    Technique,
    matrices,
    weighted_parts,
)
from autosqueeze.plans.plan import LayerPlan


class Quantize(Technique):
    knob = "bits"
    harm_grows_with_strength = True
    keeps_layer = True

    def check_value(self, value: float) -> None:
        if value not in SUPPORTED_BITS:
            raise ValueError(f"bits must be among {list(SUPPORTED_BITS)}, got {value}")

    def strength(self, value: Any) -> float:
        return 1.0 - int(value) / 32  # bits saved per weight

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        codec = TensorCodec(int(layer_plan.bits), layer_plan.group_size)
        for part_name, part in weighted_parts(compressed.module, name):
            for matrix in matrices(part):
                compressed.codecs[f"{part_name}.{matrix}"] = codec
