"""The interface every compression technique implements, and what applying a plan yields."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from optuna.distributions import BaseDistribution
from torch import nn

from autosqueeze.compression.codecs import TensorCodec, dequantize
from autosqueeze.plans.knob_facts import KNOBS
from autosqueeze.plans.knobs import KnobValues, Range, flat_values, to_distribution
from autosqueeze.plans.plan import LayerPlan, Plan

WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass(frozen=True)
class Target:
    """Where the model will run, and an input to trace it with: what a layer's options depend
    on beyond the layer itself (kernels differ per device; structural changes follow the
    model's data flow, which only a traced forward pass shows)."""

    device: str = "cpu"
    example_input: Any = None
    runtime: str = "torch"  # onnxruntime: shipped as ONNX, where torch's kernels do not go
    calibration: Any = None  # input batches whose activations weigh weights (prune_by)


@dataclass(frozen=True)
class Site:
    """A layer as the search space sees it: its name, the model around it, the target."""

    name: str
    layer: nn.Module
    model: nn.Module
    target: Target


@dataclass(frozen=True)
class Rounded:
    """The integers and fp16 scales a rounding other than the codec's own chose for a weight
    (GPTQ), under ``codec``: quantizing the weight they decode to again may choose other
    scales, so they are stored as they are."""

    codec: TensorCodec
    q: torch.Tensor  # int8-held, the weight's shape
    scale: torch.Tensor  # fp16, (rows, groups)


@dataclass
class CompressedModel:
    """A plan applied: the changed module, and how each of its weights is to be stored."""

    module: nn.Module
    plan: Plan
    target: Target = field(default_factory=Target)
    codecs: dict[str, TensorCodec] = field(default_factory=dict)  # state-dict key -> storage
    rounded: dict[str, Rounded] = field(default_factory=dict)  # state-dict key -> integers
    scratch: dict[str, Any] = field(default_factory=dict)  # per-technique state while applying

    def chosen(self, key: str, weight: torch.Tensor, codec: TensorCodec) -> Rounded | None:
        """The integers ``rounded`` holds for ``key``, while ``codec`` is still theirs and
        ``weight`` still holds what they decode to; None otherwise, and the codec rounds
        ``weight`` itself (weight sharing replaced the codec, or recovery on the grid trained
        the weight on)."""
        found = self.rounded.get(key)
        if found is None or found.codec != codec:
            return None
        decoded = dequantize(found.q, found.scale, codec.group_size).to(weight.dtype)
        return found if torch.equal(decoded, weight.detach().cpu()) else None


class Technique(ABC):
    """One knob of a LayerPlan and what it does to a layer.

    ``offer`` decides what a layer may choose (a distribution, a fixed value, or nothing);
    ``apply`` changes a compressed copy of the model; ``rebuild`` repeats only the structural
    part of ``apply`` so an artifact's weights fit the module when it is loaded; ``deploy``
    turns the loaded layer into its execution form.
    """

    knob: ClassVar[str]
    structural: ClassVar[bool] = False  # changes shapes: recovery training follows it
    reaches_neighbours: ClassVar[bool] = False  # changes layers other than the one it is on
    # changes the weight where it is (or only how it is stored), so a layer whose weight is
    # tied or whose attributes its parent reads stays what it was
    # (``autosqueeze.searchspace.anatomy``); techniques that replace or reshape the layer are not
    # offered on one
    keeps_layer: ClassVar[bool] = False
    # changes how the layer runs (its kernel or its shapes), not only what it stores: the
    # sensitivity pass times the layer with each of its values (``Evaluator.probe``)
    changes_speed: ClassVar[bool] = False
    # a stronger value never harms a layer less than a weaker one (fewer bits, more weights
    # or channels removed, a lower rank): the sensitivity pass probes the weakest first
    # and skips the rest once one breaks the layer far past the budget
    harm_grows_with_strength: ClassVar[bool] = False
    # computes its change from the inputs' statistics over ``task.calibration``, else from
    # the example input alone, too few to trust: ``validate`` and ``search`` warn when the
    # space offers it without calibration batches
    calibrated: ClassVar[bool] = False

    # what a list of this knob's values holds, for a knob searched only as a choice (a
    # range of values is refused); "": a range is fine
    listed: ClassVar[str] = ""

    @property
    def identity(self) -> Any:
        """The value that leaves a layer untouched: its ``Knob`` line's (``knob_facts``); a
        technique registered from outside the package declares its own."""
        return KNOBS[self.knob].identity

    def validate(self, values: KnobValues) -> None:
        """Raise ValueError when the space file gives this knob values it cannot take (a knob
        whose values are names, as ``kernel``'s are, overrides this)."""
        if self.listed and isinstance(values, Range):
            raise ValueError(f"{self.knob} takes a list of {self.listed}, not a range")
        for value in flat_values(values):
            if isinstance(value, str):
                raise ValueError(f"{self.knob} takes numbers, not {value[:40]!r}")
            self.check_value(value)

    def check_value(self, value: float) -> None:  # noqa: B027 - optional hook
        """Raise ValueError for one value this knob cannot take."""

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        return to_distribution(values) if is_weighted(site.layer) else None

    def why_not(self, site: Site) -> str:
        """Why ``offer`` gave this layer nothing, for ``validate``'s table ("" when it is
        plain: the knob is not for this kind of layer)."""
        return ""

    @abstractmethod
    def strength(self, value: Any) -> float:
        """How hard ``value`` compresses, from 0 (the identity) to 1: what the search's
        extremes and the dashboard's plan heatmap read."""

    def most_compressed(self, values: list[Any]) -> Any:
        """The value among ``values`` that compresses most."""
        return max(values, key=self.strength)

    @abstractmethod
    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        """Apply this knob's choice to layer ``name`` of ``compressed.module``."""

    def rebuild(self, model: CompressedModel, name: str, layer_plan: LayerPlan) -> None:  # noqa: B027
        """Make the structural change of ``apply`` without computing weights (for loading)."""

    def needs_graph(self, model: nn.Module, name: str) -> bool:
        """Whether changing layer ``name`` traces the model's data flow (Torch-Pruning, with
        an example input), which loading an artifact must then do too."""
        return self.reaches_neighbours

    def deploy(self, module: nn.Module, name: str, layer_plan: LayerPlan) -> None:  # noqa: B027
        """Turn the loaded layer into the form it runs in (after its weights are loaded)."""


def matrices(layer: nn.Module) -> dict[str, nn.Parameter]:
    """A layer's own weight matrices (and convolution kernels): floating parameters of two or
    more dimensions held by the layer itself, not its children. ``weight`` for torch's
    layers and Hugging Face's ``Conv1D``; ``in_proj_weight`` for nn.MultiheadAttention."""
    return {
        name: p
        for name, p in layer._parameters.items()  # its own, not its children's
        if p is not None and p.dim() >= 2 and p.is_floating_point()
    }


def is_weighted(layer: nn.Module) -> bool:
    """A layer whose matrices can be stored and pruned like a Linear's: torch's weighted
    layers, and any other that holds weight matrices of its own."""
    return isinstance(layer, WEIGHTED_LAYERS) or bool(matrices(layer))


def weighted_parts(module: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The weighted layers that layer ``name`` consists of now (two after factorization)."""
    layer = module.get_submodule(name)
    return [
        (f"{name}.{sub}" if sub else name, part)
        for sub, part in layer.named_modules()
        if is_weighted(part)
    ]
