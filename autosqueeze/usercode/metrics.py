"""Task metrics: ``metric(model, data, device) -> float``, higher is better.

Built-ins are looked up by name; anything else is a ``"module:callable"`` of the user's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosqueeze.common.nested import map_tensors
from autosqueeze.usercode.user_code import load_callable

Metric = Callable[[nn.Module, Iterable[tuple[Any, Any]], torch.device], float]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run a model on one batch given as a tensor, a tuple of arguments or a mapping of
    keywords (a dict, a tokenizer's ``BatchEncoding``)."""
    args, kwargs = call_arguments(inputs)
    return model(*args, **kwargs)


def call_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch as the model is called with it: a mapping as keywords, a tuple or list as
    arguments, anything else as the one argument."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a batch: tensors, nested) with every tensor on ``device``."""
    return map_tensors(lambda t: t.to(device), value)


def accuracy(
    model: nn.Module,
    data: Iterable[tuple[Any, Any]],
    device: torch.device,
    output: str | None = None,
) -> float:
    """Fraction of samples whose arg-max logit is the target class."""
    correct = total = 0
    with torch.inference_mode():
        for inputs, targets in data:
            logits = primary_output(call_model(model, to_device(inputs, device)), output)
            targets = to_device(targets, device)
            correct += (logits.argmax(dim=-1) == targets).sum().item()
            total += targets.numel()
    return correct / total if total else float("nan")


def primary_output(output: Any, key: str | None = None) -> torch.Tensor:
    """The tensor a model's output stands for: the part ``key`` names (``task.output``: a
    key, field or attribute such as ``logits``, or a tuple index such as ``0``); by default
    itself, a dict's ``sentence_embedding`` / ``last_hidden_state`` / ``logits`` (or first
    tensor), a tuple's first tensor."""
    if key is not None:
        parts = _parts(output)
        if isinstance(parts.get(key), torch.Tensor):
            return parts[key]
        tensors = [name for name, value in parts.items() if isinstance(value, torch.Tensor)]
        raise TypeError(
            f"task.output {key!r}: the model's output ({type(output).__name__}) holds no "
            f"tensor there; its tensors: {', '.join(tensors) or 'none by name'}"
        )
    if isinstance(output, torch.Tensor):
        return output
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    if isinstance(output, dict):
        for key in ("sentence_embedding", "last_hidden_state", "logits"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"no tensor in the model's output ({type(output).__name__})")


def _parts(output: Any) -> dict[str, Any]:
    """An output's named parts: a dict's (a Hugging Face ``ModelOutput`` is one) or a
    dataclass's fields, a named tuple's fields and a tuple's indices, an object's attributes."""
    if isinstance(output, torch.Tensor):
        return {}
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    if isinstance(output, dict):
        return {str(k): v for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        named = output._asdict() if hasattr(output, "_asdict") else {}
        return {**{str(i): v for i, v in enumerate(output)}, **named}
    return (
        {k: v for k, v in vars(output).items() if not k.startswith("_")}
        if hasattr(output, "__dict__")
        else {}
    )


def pooled(output: Any, inputs: Any, key: str | None = None) -> torch.Tensor:
    """One vector per sample: token outputs (B, T, H) averaged over the attention mask."""
    tensor = primary_output(output, key).float()
    if tensor.dim() == 3:
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is None:
            return tensor.mean(dim=1)
        weights = mask.to(tensor.dtype).unsqueeze(-1)
        return (tensor * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return tensor.reshape(tensor.shape[0], -1)


@contextlib.contextmanager
def recorded_outputs(model: nn.Module, key: str | None = None) -> Iterator[list[torch.Tensor]]:
    """The model's outputs while the block runs, one float tensor per call, averaged over
    tokens when there are tokens: what ``distortion`` compares, caught as the metric runs
    (a probe pays for one pass over its samples, not two)."""
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        try:
            tensor = primary_output(output, key).detach().float()
        except TypeError:
            return
        outputs.append((tensor.mean(dim=1) if tensor.dim() == 3 else tensor).cpu())

    handle = model.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


def distortion(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float | None:
    """Squared error of the outputs relative to the original's (sum ||y - y0||^2 / sum
    ||y0||^2): the sensitivity pass's additive measure of harm. Errors from independent
    layers add in it to first order, where a task metric such as accuracy hides each small
    one and then falls off a cliff. None when the calls do not line up."""
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected)):
        return None
    error = sum(_squares(a.float() - b.float()) for a, b in zip(got, expected))
    scale = sum(_squares(b.float()) for b in expected)
    return error / scale if scale > 0 else None


def _squares(t: torch.Tensor) -> float:
    """The sum of squares, summed in float64 (no float64 copy: a layer's outputs are large)."""
    return float(t.pow(2).sum(dtype=torch.float64))


def embed(
    model: nn.Module,
    data: Iterable[tuple[Any, Any]],
    device: torch.device,
    output: str | None = None,
) -> torch.Tensor:
    """The pooled outputs of every sample, on the CPU."""
    with torch.inference_mode():
        parts = [
            pooled(call_model(model, to_device(x, device)), to_device(x, device), output).cpu()
            for x, _ in data
        ]
    return torch.cat(parts)


def fidelity(reference: torch.Tensor, output: str | None = None) -> Metric:
    """Mean cosine similarity to the original model's pooled outputs (1.0 = identical)."""

    def metric(model: nn.Module, data: Iterable[tuple[Any, Any]], device: torch.device) -> float:
        got = embed(model, data, device, output)
        return torch.nn.functional.cosine_similarity(got, reference, dim=1).mean().item()

    return metric


def neighbour_overlap(reference: torch.Tensor, output: str | None = None, k: int = 10) -> Metric:
    """Mean share of each sample's top-k nearest neighbours (cosine) kept from the original."""
    k = min(k, len(reference) - 1)
    expected = _neighbours(reference, k)

    def metric(model: nn.Module, data: Iterable[tuple[Any, Any]], device: torch.device) -> float:
        found = _neighbours(embed(model, data, device, output), k)
        shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, expected)]
        return sum(shared) / (k * len(shared))

    return metric


def _neighbours(vectors: torch.Tensor, k: int) -> torch.Tensor:
    unit = torch.nn.functional.normalize(vectors, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)  # a sample is not its own neighbour
    return similarity.topk(k, dim=1).indices


METRICS: dict[str, Callable[..., float]] = {"accuracy": accuracy}  # a Metric once given output=
REFERENCE_METRICS: dict[str, Callable[[torch.Tensor, str | None], Metric]] = {
    "fidelity": fidelity,
    "neighbour_overlap": neighbour_overlap,
}
"""Metrics that need no labels: agreement with the uncompressed model's outputs."""


def resolve_metric(
    ref: str,
    *,
    search_dir: Path | None = None,
    original: nn.Module | None = None,
    data: Iterable[tuple[Any, Any]] = (),
    output: str | None = None,
) -> Metric:
    """A built-in metric by name, or the user's ``"module:callable"``. Reference metrics
    (``fidelity``, ``neighbour_overlap``) compute the original model's outputs once here.
    ``output`` (``task.output``) is the part of the model's output built-ins compare."""
    if ref in METRICS:
        return functools.partial(METRICS[ref], output=output)
    if ref in REFERENCE_METRICS and original is not None:
        reference = embed(original, data, torch.device("cpu"), output)
        return REFERENCE_METRICS[ref](reference, output)
    if ":" not in ref:
        from autosqueeze.common.errors import UserError

        raise UserError(
            f"task.metric: {ref!r} is not a built-in metric "
            f"({', '.join([*METRICS, *REFERENCE_METRICS])}) "
            "nor a 'module:callable'."
        )
    return load_callable(ref, field="task.metric", search_dir=search_dir)
