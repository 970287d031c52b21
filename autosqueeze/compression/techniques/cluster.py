"""Weight sharing (Deep Compression's clustering): a layer's weights take the nearest of
2**cluster shared values, found by 1-D k-means over the layer's weights and stored as an
fp16 codebook beside each weight's cluster-bit index, in the artifact's usual layouts
(bit-packed, a bitmap where pruned, or Huffman-coded; ``codecs.shared_values``).

Against uniform integers of the same width, the shared values sit where the weights are
(a bell curve's middle, its few outliers) and need no per-row scales; uniform integers
keep a scale per row (or group), which suits layers whose rows differ in range. The
sensitivity pass measures both per layer and the search picks. A layer's ``cluster``
replaces its ``bits``: the codebook is its storage. A rule's ``cluster_rows`` gives each
group of that many rows a codebook of its own (``codecs.shared_values``): for layers whose
rows differ in range, at 2 * 2**cluster bytes per group.
"""

from __future__ import annotations

from typing import Any

from autosqueeze.compression.codecs import INT_BITS, TensorCodec
from autosqueeze.compression.techniques.base import (
    CompressedModel,
    Technique,
    matrices,
    weighted_parts,
)
from autosqueeze.plans.plan import LayerPlan


class Cluster(Technique):
    knob = "cluster"
    harm_grows_with_strength = True
    keeps_layer = True  # values change where they are: tied weights stay tied

    def check_value(self, value: float) -> None:
        if value != 0 and value not in INT_BITS:
            raise ValueError(f"cluster is 0 (off) or index bits in 2-8, got {value}")

    def strength(self, value: Any) -> float:
        return 0.0 if value == 0 else 1.0 - int(value) / 32  # as bits: bits saved per weight

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        if not layer_plan.cluster:
            return
        codec = TensorCodec(int(layer_plan.cluster), codebook=True, rows=layer_plan.cluster_rows)
        for part_name, part in weighted_parts(compressed.module, name):
            for matrix in matrices(part):
                compressed.codecs[f"{part_name}.{matrix}"] = codec
