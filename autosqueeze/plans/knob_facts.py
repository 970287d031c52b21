"""Each technique's facts, written once, low in the import order; and the registry of techniques.

Some of what a technique is must be known where the technique is not imported: the plan reads
what an unset knob is and which types a stored value may have (a plan read from an artifact
is untrusted), a space file's rules take the settings a technique reads beside its knob, and
``techniques.check_plan`` and the size model read them too. Those facts are a ``Knob`` line
here. ``autosqueeze.compression.techniques`` imports the plan and fills ``TECHNIQUES`` with the
class each line names, in this order, then any ``@register`` adds; the plan reads the registry for
the latter without importing the techniques. So a technique in the package is its module plus
its line in ``KNOBS`` (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

WHOLE = (int, float)  # a whole number: 16.0 from a YAML list is 16
FRACTION = (float, int)
NAME = (str,)
COUNT = (int, type(None))  # None: the whole row or matrix


@dataclass(frozen=True)
class Setting:
    """A value a space rule gives all its layers beside their knobs: how a technique works
    there (its group size, its criterion), not how hard, so it is not searched. Each layer's
    plan stores it, so an artifact or a plan.json is self-contained."""

    name: str
    default: Any
    types: tuple[type, ...]  # what a stored plan may hold
    choices: tuple[str, ...] = ()  # its names; none: a count of at least 1, or None

    def check(self, value: Any) -> None:
        """Raise ValueError for a value the technique cannot take."""
        if type(value) not in self.types:
            raise ValueError(f"{self.name} is {value!r}, not a {self.types[0].__name__}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} is one of {', '.join(self.choices)}, got {value!r}")
        if not self.choices and value is not None and value < 1:
            raise ValueError(f"{self.name} {value} is not positive")


@dataclass(frozen=True)
class Knob:
    """A technique in the package, by the knob it reads from a layer's plan."""

    name: str  # the plan's key, the space file's knob, the Optuna parameter's suffix
    technique: str  # its class, "module:Class" in autosqueeze.compression.techniques
    identity: Any  # the value that leaves a layer untouched: an unset knob's
    types: tuple[type, ...]  # what a stored plan may hold
    sized: bool = False  # the size model predicts its bytes (so the knapsack prices it)
    settings: tuple[Setting, ...] = ()


# how prune picks the weights it zeroes: the smallest |w|, |w| x its input's norm (Wanda),
# SparseGPT's saliency, or 2 of every 4
PRUNE_BY = Setting("prune_by", "magnitude", NAME, ("magnitude", "activation", "hessian", "2:4"))
GROUP_SIZE = Setting("group_size", None, COUNT)  # weights per quantization scale; None: per row
# how integer weights are rounded: each to its nearest level, or by GPTQ (each input's rounding
# error moved onto the inputs not yet rounded, weighed by the calibration inputs' X^T X)
ROUND_BY = Setting("round_by", "nearest", NAME, ("nearest", "gptq"))
CLUSTER_ROWS = Setting("cluster_rows", None, COUNT)  # rows per codebook; None: one per matrix

KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        # fraction of output channels/neurons removed (structured)
        Knob("prune_channels", "channels:PruneChannels", 0.0, FRACTION),
        # fraction of an attention block's heads removed (structured)
        Knob("prune_heads", "heads:PruneHeads", 0.0, FRACTION),
        # kept fraction of the full rank after SVD; 1.0 = no factorization
        Knob("rank", "factorize:Factorize", 1.0, FRACTION, sized=True),
        # depthwise filters per input channel of a k x k conv made separable; 0 = off
        Knob("separable", "separable:Separable", 0, WHOLE),
        # fraction of weights zeroed, chosen by prune_by
        Knob("prune", "prune:Prune", 0.0, FRACTION, sized=True, settings=(PRUNE_BY,)),
        # SmoothQuant's migration strength: input outliers moved into the weights; 0 = off
        Knob("smooth", "smooth:Smooth", 0.0, FRACTION),
        # stored weight precision: 2-8 (integer, symmetric), 16 (fp16), 32 (fp32)
        Knob("bits", "quantize:Quantize", 32, WHOLE, sized=True, settings=(GROUP_SIZE, ROUND_BY)),
        # 2**cluster shared values (k-means codebook) instead of bits; 0 = off
        Knob("cluster", "cluster:Cluster", 0, WHOLE, sized=True, settings=(CLUSTER_ROWS,)),
        # execution form once loaded (autosqueeze.compression.kernels)
        Knob("kernel", "kernel:KernelChoice", "fp32", NAME),
    )
}
"""The techniques in the package, by knob, in the order they apply."""

SETTINGS: dict[str, Setting] = {s.name: s for k in KNOBS.values() for s in k.settings}

DEFAULTS: dict[str, Any] = {k.name: k.identity for k in KNOBS.values()} | {
    s.name: s.default for s in SETTINGS.values()
}
"""What a plan that does not set a knob or setting of the package holds for it."""

TYPES: dict[str, tuple[type, ...]] = {k.name: k.types for k in KNOBS.values()} | {
    s.name: s.types for s in SETTINGS.values()
}


class Registered(Protocol):
    """What the plan reads of a technique in ``TECHNIQUES``: ``compression.techniques``
    fills it with its ``Technique``s, a stage above this one, whose types it does not name."""

    @property
    def identity(self) -> Any: ...


TECHNIQUES: dict[str, Registered] = {}
"""knob -> technique, in the order they apply: ``KNOBS``'s, then those ``@register`` adds
(``autosqueeze.compression.techniques`` fills it)."""
