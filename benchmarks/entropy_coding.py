"""What entropy coding saves on all-MiniLM-L6-v2: the same plans bit-packed, Huffman-coded
and shipped (deflated), and how much a context could add.

Each plan stores every layer the MiniLM study's space offers at one integer form; the table
gives the fidelity of the loaded artifact and its bytes three ways: bit-packed with no
entropy coding (``artifact.bit_packed_bytes``, not deflated), with the integers Huffman-coded
where that is smaller, and as shipped. Then, over the Linears, the zeroth-order entropy of
the stored levels beside their entropy conditioned on 16 classes of input column or of row
(by the levels' spread): what a context model could gain over the Huffman code.

    pip install -e ".[transformers]"
    python benchmarks/entropy_coding.py
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch

from autosqueeze.artifacts.artifact import (
    artifact_bytes,
    bit_packed_bytes,
    load_artifact,
    stored_bytes,
)
from autosqueeze.compression.codecs import quantize
from autosqueeze.compression.techniques import compress
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.task import load_task
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config

warnings.filterwarnings("ignore")
CONFIG = Path(__file__).resolve().parent.parent / "studies" / "minilm.yaml"
FORMS = ((6, 64), (6, None), (7, None), (8, None))  # (bits, weights per scale; None: a row)
CLASSES = 16


def main() -> None:
    config = load_config(CONFIG)
    task = load_task(config)
    space = build_space(task.model, config.space, task.target)
    print("| plan | fidelity | bit-packed | Huffman-coded | shipped | coding | and deflate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for bits, group in FORMS:
        plan = Plan(
            {
                name: LayerPlan.of(**{**knobs.settings, "group_size": group}, bits=bits)
                for name, knobs in space.layers.items()
            }
        )
        shipped = artifact_bytes(compress(task.model, plan, task.target))
        packed = len(stored_bytes(bit_packed_bytes(shipped)))
        coded = len(stored_bytes(shipped))
        loaded = load_artifact(shipped, copy.deepcopy(task.model), task.target)
        fidelity = task.evaluate_metric(loaded)
        form = f"int{bits}, " + (f"groups of {group}" if group else "a scale per row")
        print(
            f"| {form} | {fidelity:.4f} | {packed:,} | {coded:,} | {len(shipped):,} | "
            f"{packed / coded:.3f}x | {packed / len(shipped):.3f}x |",
            flush=True,
        )
    print("\n| form | entropy, bits | given the column's class | given the row's class |")
    print("|---|---:|---:|---:|")
    linears = [m for m in task.model.modules() if isinstance(m, torch.nn.Linear)]
    for bits, group in ((6, 64), (6, None), (4, 32)):
        totals = np.zeros(3)
        count = 0
        for layer in linears:
            q = quantize(layer.weight.detach(), bits, group)[0].numpy().astype(np.int64)
            q += 2 ** (bits - 1)
            totals += q.size * np.array(
                [_entropy(q.ravel(), bits), _conditional(q, 0, bits), _conditional(q, 1, bits)]
            )
            count += q.size
        marginal, column, row = totals / count
        form = f"int{bits}, " + (f"groups of {group}" if group else "a scale per row")
        print(f"| {form} | {marginal:.3f} | {column:.3f} | {row:.3f} |")


def _entropy(levels: np.ndarray, bits: int) -> float:
    counts = np.bincount(levels, minlength=2**bits)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _conditional(q: np.ndarray, axis: int, bits: int) -> float:
    """The entropy of ``q``'s levels given the class (by spread) of their column (axis 0)
    or row (axis 1): CLASSES equally filled classes."""
    spread = q.std(axis)
    cuts = np.quantile(spread, np.linspace(0, 1, CLASSES + 1)[1:-1])
    classes = np.digitize(spread, cuts)
    total = 0.0
    for k in range(CLASSES):
        part = q[:, classes == k] if axis == 0 else q[classes == k]
        if part.size:
            total += part.size * _entropy(part.ravel(), bits)
    return total / q.size


if __name__ == "__main__":
    main()
