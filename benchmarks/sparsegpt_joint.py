"""SparseGPT's joint form against ours: prune and round in one sweep, or prune, then round?

Every encoder Linear of all-MiniLM-L6-v2 loses a share of its weights (SparseGPT's mask,
``prune_by: hessian``) and goes to 4 bits in groups of 64, three ways: SparseGPT then rounded
to nearest; SparseGPT then GPTQ with the zeros kept (what a plan with ``prune_by: hessian``
and ``round_by: gptq`` does); and SparseGPT's joint form, one GPTQ sweep that chooses each
block's mask on the way (``rounding.round_matrix(prune=...)``). Hessians come from the
MiniLM study's 512 calibration sentences on the original model, alike for all three;
fidelity is the study's metric on its 256 validation sentences.

    pip install -e ".[transformers]"
    python -P benchmarks/sparsegpt_joint.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from autosqueeze.compression.codecs import dequantize, quantize
from autosqueeze.compression.rounding import round_layer, round_matrix
from autosqueeze.compression.techniques.prune import prune_by_hessian
from autosqueeze.problem.task import load_task
from autosqueeze.settings.config import load_config

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.yaml"
BITS, GROUP = 4, 64


def _hessians(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def take(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            found[name] = found.get(name, 0) + x.T @ x

        return take

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return found


def fidelity(task, hessians: dict[str, torch.Tensor], share: float, form: str) -> float:
    model = copy.deepcopy(task.model).eval()
    for name, hessian in hessians.items():
        layer = model.get_submodule(name)
        if form == "joint":
            q, scale = round_matrix(layer.weight, hessian, BITS, GROUP, prune=share)
        else:
            prune_by_hessian(layer, hessian, share)
            if form == "then GPTQ":
                round_layer(layer, hessian, BITS, GROUP)
                continue
            q, scale = quantize(layer.weight.detach(), BITS, GROUP)
        with torch.no_grad():
            layer.weight.copy_(dequantize(q, scale, GROUP))
    return float(task.evaluate_metric(model))


def main() -> None:
    from autosqueeze.examples import minilm

    task = load_task(load_config(STUDY))
    names = [
        n
        for n, m in task.model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("encoder")
    ]
    hessians = _hessians(task.model, names, [inputs for inputs, _ in minilm.calibration()])
    forms = ("then nearest", "then GPTQ", "joint")
    print(
        f"| every encoder Linear, {BITS} bits, groups of {GROUP} | "
        + " | ".join(f"SparseGPT {f}" if f != "joint" else "joint sweep" for f in forms)
        + " |"
    )
    print("|---|" + "---:|" * len(forms))
    for share in (0.25, 0.5):
        got = [fidelity(task, hessians, share, form) for form in forms]
        print(f"| {share:.0%} pruned | " + " | ".join(f"{g:.4f}" for g in got) + " |", flush=True)


if __name__ == "__main__":
    main()
