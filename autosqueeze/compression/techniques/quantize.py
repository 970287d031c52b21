"""Weight quantization: each weight of a layer is stored at the plan's bit-width.

Applying it records a TensorCodec per weight; the artifact writer quantizes and packs, and
the model evaluated is the one loaded back from those packed bytes. With ``round_by: gptq``
(integers only) the layer's weight is rounded here instead, by GPTQ on its calibration
inputs' Hessian (``compression.rounding``), and the integers and scales it chose are what the
artifact stores (``CompressedModel.rounded``). GPTQ runs after pruning, so it keeps the pruned
zeros and moves their error onto the weights left. Weights GPTQ does not round (an
embedding's, ``in_proj_weight``, a 3-D or transposed convolution's, a layer that never ran on
the calibration inputs) round to nearest. A Linear (or Conv1D) the plan also prunes by the
Hessian is pruned here, in GPTQ's sweep (SparseGPT's joint form, ``rounding.prunes_as_it_rounds``),
not by ``prune`` before it.
"""

from __future__ import annotations

from typing import Any

from autosqueeze.compression.codecs import SUPPORTED_BITS, TensorCodec
from autosqueeze.compression.rounding import (
    prunes_as_it_rounds,
    round_layer,
    rounds,
    rounds_by_gptq,
)
from autosqueeze.compression.techniques.base import (
    CompressedModel,
    Rounded,
    Technique,
    matrices,
    weighted_parts,
)
from autosqueeze.compression.techniques.calibration import input_hessians
from autosqueeze.plans.knob_facts import ROUND_BY
from autosqueeze.plans.plan import LayerPlan

_WHY = "round_by gptq"


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
        ROUND_BY.check(layer_plan.round_by)
        codec = TensorCodec(int(layer_plan.bits), layer_plan.group_size)
        parts = weighted_parts(compressed.module, name)
        hessians = {}
        if rounds_by_gptq(layer_plan):
            wanted = {n for n, p in parts if rounds(p)}
            hessians = input_hessians(
                compressed, wanted, _gptq_layers(compressed), _WHY, taken="rounding"
            )
        for part_name, part in parts:
            for matrix in matrices(part):
                key = f"{part_name}.{matrix}"
                compressed.codecs[key] = codec
                if matrix == "weight" and part_name in hessians:
                    prune = layer_plan.prune if prunes_as_it_rounds(layer_plan, part) else 0.0
                    hessian = hessians[part_name]
                    q, scale = round_layer(part, hessian, codec.bits, codec.group_size, prune)
                    compressed.rounded[key] = Rounded(codec, q, scale)


def _gptq_layers(compressed: CompressedModel) -> set[str]:
    """The parts GPTQ rounds, of every layer the plan rounds by it: their Hessians come from
    one pass, on the model as it is when quantization starts."""
    return {
        part_name
        for name, lp in compressed.plan.layers.items()
        if rounds_by_gptq(lp)
        for part_name, part in weighted_parts(compressed.module, name)
        if rounds(part)
    }
