"""A front model shipped as a ``torch.export`` program (``.pt2``).

The artifact (``artifact.py``) is the search's file: the smallest bytes, but it loads only
with autosqueeze, the user's model factory and, for channel-pruned plans, Torch-Pruning. A
program is the deployed model traced to ATen operations: plain PyTorch runs it with
``torch.export.load(path).module()``, nothing else imported (a library whose output type
the model returns, such as transformers' ``ModelOutput``, must be importable). Its weights
are held as the kernels hold them while they run, so a layer stored at fewer bits than its
kernel uses takes more bytes here; ``export_program`` names each such layer.

autosqueeze writes programs and never loads one: ``torch.export.load`` unpickles parts of
the file, so a program is code from whoever made it (SECURITY.md).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosqueeze.kernels import KERNELS
from autosqueeze.metrics import call_arguments
from autosqueeze.nested import map_leaves
from autosqueeze.plan import Plan
from autosqueeze.task import batch_of, samples_in


def export_program(model: nn.Module, plan: Plan, example_input: Any, path: Path) -> list[str]:
    """Trace ``model`` (loaded from the plan's artifact, in its execution form) on
    ``example_input`` and write the program to ``path`` (whole or not at all). The batch
    dimension is left free where the model allows it. Returns notes for the user: the
    batch the program takes, and each layer held at more bits than the artifact stores.
    Raises ValueError naming a layer whose kernel cannot be traced."""
    refused = [
        f"layer {name!r} runs {lp.kernel!r}: {KERNELS[lp.kernel].export_refusal}"
        for name, lp in plan.layers.items()
        if lp.kernel in KERNELS and KERNELS[lp.kernel].export_refusal
    ]
    if refused:
        raise ValueError("; ".join(refused) + "; ship the artifact, or a trial without it")
    program, batch_note = _traced(model.eval(), example_input)
    partial = path.with_name(f".{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.pt2")
    try:
        torch.export.save(program, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return [batch_note, *_widened(plan)]


def _traced(model: nn.Module, example_input: Any) -> tuple[torch.export.ExportedProgram, str]:
    """The program with a free batch dimension (traced on two samples or more: a size of 1
    is specialized), else at the example's own batch."""
    held = samples_in(example_input)
    wider = batch_of(example_input, max(2, held))
    args, kwargs = call_arguments(wider)
    try:
        free = torch.export.Dim.AUTO
        shapes = _batch_shapes(args, kwargs, free)
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
            own_args, own_kwargs = call_arguments(example_input)
            program.module()(*own_args, **own_kwargs)  # the example's own batch still runs
        return program, "the program takes any batch size"
    except Exception:  # a model whose code fixes the batch: trace it as the example has it
        args, kwargs = call_arguments(example_input)
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs)
        return program, f"the program takes batches of {held}, as the example input"


def _batch_shapes(args: tuple[Any, ...], kwargs: dict[str, Any], free: Any) -> Any:
    """``torch.export``'s ``dynamic_shapes``: dimension 0 of every tensor free."""

    def spec(leaf: Any) -> Any:
        return {0: free} if isinstance(leaf, torch.Tensor) and leaf.dim() else None

    return map_leaves(spec, kwargs) if kwargs else map_leaves(spec, args)


def _widened(plan: Plan) -> list[str]:
    """Layers the artifact stores at fewer bits than their kernel holds while it runs."""
    notes = []
    for name, lp in sorted(plan.layers.items()):
        kernel = KERNELS.get(lp.kernel)
        if kernel is not None and lp.bits < kernel.weight_bits:
            notes.append(
                f"layer {name!r}: stored at {lp.bits} bits in the artifact, held at "
                f"{kernel.weight_bits} by its {lp.kernel!r} kernel in the program"
            )
    return notes


__all__ = ["export_program"]
