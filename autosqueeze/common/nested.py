"""The one walk over the nested inputs and outputs of models we did not write.

A batch or an output is a tensor, or a mapping (a Hugging Face ``BatchEncoding`` is one,
a ``ModelOutput`` a dict), list, tuple, named tuple or dataclass of them, nested. Everything
that moves, slices, counts or compares tensors in such a structure goes through here.
``torch.utils._pytree`` is private and treats a container type it was not told about as a
single leaf, so a ``BatchEncoding`` would pass through whole.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch


def tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value``, in order."""
    return [leaf for leaf in leaves(value) if isinstance(leaf, torch.Tensor)]


def leaves(value: Any) -> Iterator[Any]:
    """Every leaf of ``value`` (tensors and anything else that is not a container), in order."""
    if isinstance(value, Mapping):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from leaves(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from leaves(getattr(value, f.name))
    else:
        yield value


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with every tensor replaced by ``fn(tensor)``, anything else as it was."""
    return map_leaves(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, value)


def map_leaves(fn: Callable[[Any], Any], value: Any) -> Any:
    """``value`` with every leaf replaced by ``fn(leaf)``: mappings come back as plain dicts,
    lists and tuples (named ones too) as their own type, dataclasses as copies."""
    if isinstance(value, Mapping):
        return {k: map_leaves(fn, v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(map_leaves(fn, v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_leaves(fn, v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        mapped = copy.copy(value)  # not ``replace``: it cannot set fields with init=False
        for f in dataclasses.fields(value):
            object.__setattr__(mapped, f.name, map_leaves(fn, getattr(value, f.name)))
        return mapped
    return fn(value)


__all__ = ["leaves", "map_leaves", "map_tensors", "tensors"]


def samples_in(inputs: Any) -> int:
    """How many samples a batch holds: the first dimension of its first tensor that has
    one (1 if none has)."""
    return next((int(t.shape[0]) for t in tensors(inputs) if t.dim()), 1)


def batch_of(inputs: Any, size: int) -> Any:
    """The first ``size`` samples of a batch along dim 0 (repeated when the batch is smaller)."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] == 0:
            return t
        repeats = -(-size // t.shape[0])
        return t.repeat(repeats, *([1] * (t.dim() - 1)))[:size].contiguous()

    return map_tensors(cut, inputs)
