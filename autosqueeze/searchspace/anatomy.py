"""What the search space must know about a model's layers beyond their types.

Two facts decide whether a layer may be replaced (factorized into two, converted to a kernel's
module, narrowed) or only changed where it stands (its weight quantized or pruned in place):

- **tied weights**: one tensor held by several layers (a language model's embedding and its
  output head). Replacing one holder unties them; the weight is one unit of the search.
- **outside reads**: a parent that reads a layer's attributes instead of only calling it
  (``nn.MultiheadAttention`` passes ``out_proj.weight`` to a functional call; Hugging Face's
  ViT reads ``projection.weight.dtype``, Whisper ``conv1.stride``). A replacement module
  lacks them. Found by watching one forward pass on the task's example input.
- **an own forward**: a subclass of a torch layer that changes what it computes (BART's
  learned positional embedding turns token ids into positions first). A replacement built
  for the torch layer would drop that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from autosqueeze.compression.kernels import is_conv1d
from autosqueeze.usercode.metrics import call_model


@dataclass(frozen=True)
class Anatomy:
    """Per layer name: the layers sharing its weight (itself included, in model order), and
    the attributes something other than the layer itself read during a forward pass."""

    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)
    read_outside: dict[str, frozenset[str]] = field(default_factory=dict)
    own_forward: dict[str, str] = field(default_factory=dict)  # layer -> its class's name

    def must_stay(self, name: str) -> str | None:
        """Why layer ``name`` may not be replaced, or None when it may."""
        if len(self.tied.get(name, ())) > 1:
            others = [n for n in self.tied[name] if n != name]
            return f"its weight is tied to {', '.join(others)}"
        if self.read_outside.get(name):
            return f"the model reads its {', '.join(sorted(self.read_outside[name]))}"
        if name in self.own_forward:
            return f"its class {self.own_forward[name]} computes its own forward"
        return None


def anatomy(model: nn.Module, layers: list[str], example_input: Any = None) -> Anatomy:
    """The tied weights among ``layers``, the subclasses with a forward of their own and,
    when there is an example input, what the model reads of each from outside."""
    reads = _outside_reads(model, layers, example_input) if example_input is not None else {}
    return Anatomy(_tied(model, layers), reads, _own_forward(model, layers))


def _own_forward(model: nn.Module, layers: list[str]) -> dict[str, str]:
    found = {}
    for name in layers:
        if is_conv1d(model.get_submodule(name)):
            continue  # Hugging Face's Conv1D is a Linear stored transposed: kernels take it as one
        cls = type(model.get_submodule(name))
        torch_class = next((c for c in cls.__mro__ if c.__module__.startswith("torch.nn.")), None)
        base = cast("type[nn.Module] | None", torch_class)  # the torch layer class it extends
        if base is not None and base is not cls and cls.forward is not base.forward:
            found[name] = cls.__name__
    return found


def _tied(model: nn.Module, layers: list[str]) -> dict[str, tuple[str, ...]]:
    holders: dict[int, list[str]] = {}
    for name in layers:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor):
            holders.setdefault(id(weight), []).append(name)
    return {name: tuple(names) for names in holders.values() if len(names) > 1 for name in names}


def _outside_reads(
    model: nn.Module, layers: list[str], example_input: Any
) -> dict[str, frozenset[str]]:
    """Run the model once with each layer's class swapped for a subclass that records the
    public attributes read while the layer is not running its own call."""
    reads: dict[int, set[str]] = {}
    running: set[int] = set()
    watched: dict[str, tuple[nn.Module, type]] = {}

    def watching(cls: type[nn.Module]) -> type:
        def __getattribute__(self: nn.Module, attr: str) -> Any:
            key = object.__getattribute__(self, "__dict__").get("_autosqueeze_watch")
            if key is not None and key not in running and not attr.startswith("_"):
                if attr not in _CALLING:
                    reads[key].add(attr)
            return cls.__getattribute__(self, attr)

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            key = object.__getattribute__(self, "__dict__")["_autosqueeze_watch"]
            running.add(key)
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                running.discard(key)

        return type(
            cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__call__": __call__}
        )

    try:
        for name in layers:
            layer = model.get_submodule(name)
            if id(layer) in reads:
                continue
            reads[id(layer)] = set()
            watched[name] = (layer, type(layer))
            layer.__dict__["_autosqueeze_watch"] = id(layer)
            layer.__class__ = watching(type(layer))
        with torch.inference_mode():
            call_model(model, example_input)
    except Exception:  # noqa: BLE001 - the model's own failures are reported where it is evaluated
        return {}
    finally:
        for layer, cls in watched.values():
            layer.__class__ = cls
            layer.__dict__.pop("_autosqueeze_watch", None)
    return {
        name: frozenset(reads[id(layer)])
        for name, (layer, _) in watched.items()
        if reads[id(layer)]
    }


_CALLING = {"forward", "training"}  # read on the way to calling a layer, not a contract
