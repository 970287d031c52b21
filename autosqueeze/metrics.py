"""Task metrics: ``metric(model, data, device) -> float``, higher is better.

Built-ins are looked up by name; anything else is a ``"module:callable"`` of the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosqueeze.user_code import load_callable

Metric = Callable[[nn.Module, Iterable[tuple[Any, Any]], torch.device], float]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run a model on one batch given as a tensor, a tuple of arguments or a dict of keywords."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def accuracy(model: nn.Module, data: Iterable[tuple[Any, Any]], device: torch.device) -> float:
    """Fraction of samples whose arg-max logit is the target class."""
    correct = total = 0
    with torch.inference_mode():
        for inputs, targets in data:
            logits = call_model(model, to_device(inputs, device))
            targets = to_device(targets, device)
            correct += (logits.argmax(dim=-1) == targets).sum().item()
            total += targets.numel()
    return correct / total if total else float("nan")


METRICS: dict[str, Metric] = {"accuracy": accuracy}


def resolve_metric(ref: str, *, search_dir: Path | None = None) -> Metric:
    """A built-in metric by name, or the user's ``"module:callable"``."""
    if ref in METRICS:
        return METRICS[ref]
    if ":" not in ref:
        from autosqueeze.errors import UserError

        raise UserError(
            f"task.metric: {ref!r} is not a built-in metric ({', '.join(METRICS)}) "
            "nor a 'module:callable'."
        )
    return load_callable(ref, field="task.metric", search_dir=search_dir)
