"""Smaller students as base models: "train big, then compress" the other way round.

A study's ``model.candidates`` names factories of smaller models (fewer channels or blocks,
e.g. the original with every other block dropped, as DistilBERT drops layers). Each is
distilled from the original on ``task.calibration`` (its outputs matched, and the labels
where ``recovery.labels`` asks) before the search, and the search then chooses which model
a plan compresses (``Plan.base``) as one more categorical dimension. Distilling costs
hundreds of steps, so the distilled weights are cached by everything they depend on (the
original's and the student's starting weights, the calibration data, the settings) and a
resumed or second study loads them.

A factory is called under a fixed seed, so a randomly initialised student starts from the
same weights every time (and its cache key holds still).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from autosqueeze.common.content_cache import cache_dir, content_key
from autosqueeze.common.errors import UserError
from autosqueeze.common.nested import tensors
from autosqueeze.compression.recovery import Recovery, floating_tensors
from autosqueeze.problem.plain_weights import fold_parametrizations
from autosqueeze.usercode.metrics import call_model
from autosqueeze.usercode.user_code import call_user, describe, load_callable

FOLDER = "students"  # under the user's cache (``content_cache.cache_dir``)
FORMAT = b"autosqueeze-student-1"  # in every key: a change to distillation invalidates them


def load_factories(config: Any, original: nn.Module, example: Any) -> dict[str, Callable]:
    """``model.candidates``' factories, each checked to build a module that runs on the
    example input and answers with the original's output shapes (distillation compares
    them); a UserError naming the candidate otherwise."""
    factories: dict[str, Callable] = {}
    if not config.model.candidates:
        return factories
    if not config.task.calibration:
        raise UserError(
            "model.candidates: students are distilled from the model on task.calibration, "
            "which is not set; add task.calibration: 'module:callable' returning input batches."
        )
    with torch.inference_mode():
        wanted = [tuple(t.shape) for t in floating_tensors(call_model(original, example))]
    for name, ref in config.model.candidates.items():
        field = f"model.candidates.{name}"
        factory = load_callable(ref, field=field, search_dir=config.folder)
        student = build(factory, field, ref)
        try:
            with torch.inference_mode():
                got = [tuple(t.shape) for t in floating_tensors(call_model(student, example))]
        except Exception as exc:  # noqa: BLE001 - the user's student raised
            why = describe(exc)
            raise UserError(f"{field}: the student fails on the example input: {why}") from None
        if got != wanted:
            raise UserError(
                f"{field}: the student answers with tensors of shapes {got}, the model with "
                f"{wanted}; a student is distilled to match the model's outputs."
            )
        factories[name] = factory
    return factories


def build(factory: Callable, field: str, ref: str) -> nn.Module:
    """A fresh student from its factory, under a fixed seed, on the CPU in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = call_user(factory, field=field, ref=ref)
    if not isinstance(student, nn.Module):
        kind = type(student).__name__
        raise UserError(f"{field}: {ref!r} returned {kind}, not a torch.nn.Module.")
    return fold_parametrizations(student.cpu().eval())


def distilled(
    name: str,
    factory: Callable,
    ref: str,
    teacher: nn.Module,
    recovery: Recovery,
    folder: Path | None = None,
) -> tuple[nn.Module, bool]:
    """The student distilled from ``teacher`` by ``recovery`` (on one thread, so every
    process makes the same weights), from the cache where it is there; and whether it was."""
    student = build(factory, f"model.candidates.{name}", ref)
    path = (folder or cache_dir() / FOLDER) / f"{_key(student, teacher, recovery)}.safetensors"
    if path.is_file():
        try:
            load_model(student, path, strict=True)  # tied weights stay tied
            return student.eval(), True
        except Exception:  # noqa: BLE001 - a damaged or foreign file: distil again
            path.unlink(missing_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recovery.run(student, teacher)
    finally:
        torch.set_num_threads(previous)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_model(student, str(partial))  # a tied weight stored once
    partial.replace(path)  # a reader never sees half a file
    return student.eval(), False


def _key(student: nn.Module, teacher: nn.Module, recovery: Recovery) -> str:
    """What the distilled weights depend on, hashed: both models' weights (and the student's
    layout, through its state's names and shapes), the calibration batches and labels, and
    the distillation's settings."""
    digest = hashlib.sha256(FORMAT)
    for model in (teacher, student):
        for key, tensor in sorted(model.state_dict().items()):
            digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(content_key(tensor))
        digest.update(b"|")
    for batch in _batches(recovery.inputs, recovery.labels or []):
        digest.update(content_key(batch))
    settings = (recovery.steps, recovery.lr, recovery.seed, recovery.window, recovery.min_gain)
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:32]


def _batches(*nested: Iterable[Any]) -> list[torch.Tensor]:
    return [t for part in nested for item in part for t in tensors(item)]


__all__ = ["FOLDER", "build", "distilled", "load_factories"]
