"""The model's channel dependency graph (Torch-Pruning's), shared by the structured
techniques: removing a layer's output channels, or an attention block's heads, narrows every
tensor coupled to them (the next layer's inputs, BatchNorm statistics, the other branch of a
residual add, the key and value of a query), so the model gets smaller tensors rather than
masks. One graph per model being compressed: each technique prunes through it, so it always
describes the model as it is now."""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn

from autosqueeze.common.time_limit import time_limit
from autosqueeze.compression.recovery import floating_tensors
from autosqueeze.compression.techniques.base import CompressedModel, Technique
from autosqueeze.plans.plan import LayerPlan
from autosqueeze.usercode.metrics import call_model, to_device
from autosqueeze.usercode.user_code import describe

T = TypeVar("T")

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class RemovesFraction(Technique):
    """A structured knob: the fraction of a layer's units (output channels, heads) removed
    through the graph, with everything coupled to them."""

    unit: ClassVar[str]  # what the fraction is of, for messages
    harm_grows_with_strength = True
    structural = True
    reaches_neighbours = True  # the coupled layers lose their matching inputs
    changes_speed = True

    def check_value(self, value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"{self.knob} is a fraction of {self.unit} in [0, 1), got {value}")

    def strength(self, value: Any) -> float:
        return float(value)  # the share removed

    def rebuild(self, model: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        self.apply(model, name, layer_plan)  # same counts; which units does not matter here


def width(layer: nn.Module) -> int:
    """A layer's output channels (features)."""
    return int(cast(torch.Tensor, layer.weight).shape[0])


def out_channels(layer: nn.Module) -> Any:
    """Torch-Pruning's function that removes ``layer``'s output channels."""
    import torch_pruning as tp

    return (
        tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
    )


def build_graph(module: nn.Module, example_input: Any) -> Any:
    import torch_pruning as tp

    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            module,
            example_inputs=_on_device_of(module, example_input),
            forward_fn=call_model,
            output_transform=floating_tensors,
            verbose=False,
        )


def original_widths(compressed: CompressedModel) -> dict[str, int]:
    """Each prunable layer's width before the first structural change (every structured
    technique asks before it changes anything): what a fraction removed is a fraction of."""
    if "original_widths" not in compressed.scratch:
        compressed.scratch["original_widths"] = {
            n: width(m) for n, m in compressed.module.named_modules() if isinstance(m, PRUNABLE)
        }
    return compressed.scratch["original_widths"]


def model_graph(compressed: CompressedModel) -> tuple[Any, dict[str, int]]:
    """The dependency graph of the model being compressed, and each layer's original width."""
    widths = original_widths(compressed)
    if "dependency_graph" not in compressed.scratch:
        if compressed.target.example_input is None:
            raise ValueError("structured pruning needs the task's example input to trace the model")
        compressed.scratch["dependency_graph"] = build_graph(
            compressed.module, compressed.target.example_input
        )
    return compressed.scratch["dependency_graph"], widths


def outputs(model: nn.Module, example_input: Any) -> list[torch.Tensor]:
    with torch.inference_mode():
        return floating_tensors(call_model(model, _on_device_of(model, example_input)))


def _on_device_of(model: nn.Module, example_input: Any) -> Any:
    """The example input (kept on the CPU) where the model is: a probe's copy is on the GPU."""
    first = next(model.parameters(), None)
    return example_input if first is None else to_device(example_input, first.device)


ANALYSIS_LIMIT_S = 120.0  # Torch-Pruning on one model (on a tiny LLaMA it ran past 5 minutes)
LAYER_LIMIT_S = 20.0  # ... and on one of its layers

Accept = Callable[[nn.Module, nn.Module, dict[str, list[int]]], bool]


def removable(
    model: nn.Module, example_input: Any, removals: dict[str, list[int]], accept: Accept
) -> dict[str, frozenset[int]]:
    """The layers (of ``removals``: name -> output channels to remove as a test) whose channels
    can go: on a copy, through the graph, with the model still running and ``accept(model,
    pruned copy, inputs lost)`` true, where inputs lost names the layers that lost input
    channels, and which. Each with its group's key (the ids of the modules it narrows):
    layers coupled in one group share a verdict. A layer Torch-Pruning cannot group is not
    removable. Grouping one layer past ``LAYER_LIMIT_S`` (it grows without end on some
    models: LLaMA's rotary embedding) or the whole analysis past ``ANALYSIS_LIMIT_S`` fails
    it for the whole model: the next layer would only take as long."""
    with time_limit(ANALYSIS_LIMIT_S):
        graph = build_graph(model, example_input)
    deadline = time.monotonic() + ANALYSIS_LIMIT_S
    verdicts: dict[frozenset[int], bool] = {}
    found = {}
    for name, idxs in removals.items():
        layer = model.get_submodule(name)
        if layer not in graph.module2node:
            continue
        limit = min(LAYER_LIMIT_S, deadline - time.monotonic())
        try:
            with time_limit(limit):
                group = graph.get_pruning_group(layer, out_channels(layer), idxs=idxs)
                key = frozenset(id(dep.target.module) for dep, _ in group)
                if key not in verdicts:
                    verdicts[key] = _removes_cleanly(model, name, idxs, example_input, accept)
        except TimeoutError:
            raise TimeoutError(f"its analysis of layer {name} ran past {limit:.0f} s") from None
        except Exception:  # noqa: BLE001 - Torch-Pruning cannot group this layer: not removable
            continue
        if verdicts[key]:
            found[name] = key
    return found


def _removes_cleanly(
    model: nn.Module, name: str, idxs: list[int], example_input: Any, accept: Accept
) -> bool:
    import torch_pruning as tp

    trial = copy.deepcopy(model)
    names = {m: n for n, m in trial.named_modules()}
    layer = trial.get_submodule(name)
    try:
        group = build_graph(trial, example_input).get_pruning_group(
            layer, out_channels(layer), idxs=idxs
        )
        lost = {
            names[dep.target.module]: list(map(int, dep_idxs))
            for dep, dep_idxs in group
            if dep.handler in (tp.prune_linear_in_channels, tp.prune_conv_in_channels)
            and dep.target.module in names
        }
        group.prune()
        return accept(model, trial, lost)
    except Exception:  # noqa: BLE001 - any failure means: not removable on its own
        return False


_ANALYSES: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def once_per_model(model: nn.Module, kind: str, find: Callable[[], T]) -> T:
    """``find()`` for ``model`` once (per kind of analysis): every layer of a model asks the
    same question of one graph. Torch-Pruning failing on the model (it raises on some, e.g.
    a channel shuffle, and runs without end on others) is remembered too, for every kind
    (they share the graph), and raised for every layer, so the space withholds the knob and
    says why."""
    done = _ANALYSES.setdefault(model, {})
    if kind not in done and "failure" not in done:
        try:
            done[kind] = find()
        except Exception as exc:  # noqa: BLE001 - a third-party graph analysis
            done["failure"] = f"Torch-Pruning cannot analyse the model: {describe(exc)}"
    if "failure" in done:
        raise RuntimeError(done["failure"])
    return done[kind]
