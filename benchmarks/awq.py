"""Would activation-aware scaling (AWQ, Lin et al. 2024) add anything to GPTQ on MiniLM?

AWQ multiplies a Linear's weight columns by s_j = mean|x_j|^alpha (normalized so that
max(s) min(s) = 1) and divides its inputs by them, alpha per layer from a grid of 20 values
on [0, 0.95], the one whose weight, rounded to nearest, moves the layer's output least on
calibration inputs (64 rows of each of the 8 calibration batches). Here every encoder Linear
of all-MiniLM-L6-v2 goes to 4 bits in groups of 64, four ways: rounded to nearest, AWQ then
nearest, GPTQ (``round_by: gptq``, Hessians from the same inputs, scaled along), and AWQ
then GPTQ. Fidelity is the MiniLM study's metric on its 256 validation sentences; the
calibration inputs are its 512 calibration sentences. The factors stay floats (as AWQ's
reference code keeps them): the best case for AWQ, before any storage constraint.

    pip install -e ".[transformers]"
    python -P benchmarks/awq.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from autosqueeze.compression.codecs import dequantize, quantize
from autosqueeze.compression.rounding import round_layer
from autosqueeze.problem.task import load_task
from autosqueeze.settings.config import load_config

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.yaml"
BITS, GROUP = 4, 64
ALPHAS = [i / 20 for i in range(20)]


class _Divide(nn.Module):
    def __init__(self, factors: torch.Tensor) -> None:
        super().__init__()
        self.inverse = 1 / factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inverse


def _inputs(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, list]:
    """Per layer: X^T X (float64), sum |x_j| and 64 sampled rows per batch of its inputs."""
    found: dict[str, list] = {n: [0, 0, []] for n in names}
    generator = torch.Generator().manual_seed(0)

    def hook(name: str):
        def take(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            found[name][0] = found[name][0] + x.double().T @ x.double()
            found[name][1] = found[name][1] + x.abs().sum(0)
            found[name][2].append(x[torch.randperm(len(x), generator=generator)[:64]])

        return take

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return found


def _awq_factors(weight: torch.Tensor, mean: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """AWQ's per-input factors: the grid's alpha whose nearest-rounded weight errs least."""
    want = rows @ weight.T
    base = (mean / mean.max()).clamp_min(1e-4)
    best, chosen = float("inf"), torch.ones_like(mean)
    for alpha in ALPHAS:
        s = base**alpha
        s = s / (s.max() * s.min()).sqrt()
        q, scale = quantize(weight * s, BITS, GROUP)
        error = float(((rows / s) @ dequantize(q, scale, GROUP).T - want).pow(2).mean())
        if error < best:
            best, chosen = error, s
    return chosen


def fidelity(task, batches: list[dict], awq: bool, gptq: bool) -> float:
    model = copy.deepcopy(task.model).eval()
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder")
    ]
    found = _inputs(model, names, batches)
    for name in names:
        layer = model.get_submodule(name)
        hessian, total, rows = found[name]
        weight = layer.weight.detach()
        if awq:
            s = _awq_factors(weight, total, torch.cat(rows))
            with torch.no_grad():
                layer.weight.mul_(s)
            hessian = hessian / s.double()[:, None] / s.double()[None, :]
            model.set_submodule(name, nn.Sequential(_Divide(s), layer))
        if gptq:
            round_layer(layer, hessian, BITS, GROUP)
        else:
            q, scale = quantize(layer.weight.detach(), BITS, GROUP)
            with torch.no_grad():
                layer.weight.copy_(dequantize(q, scale, GROUP))
    return float(task.evaluate_metric(model))


def main() -> None:
    from autosqueeze.examples import minilm

    task = load_task(load_config(STUDY))
    batches = [inputs for inputs, _ in minilm.calibration()]
    print(f"| every encoder Linear, {BITS} bits, groups of {GROUP} | fidelity |\n|---|---:|")
    for label, awq, gptq in (
        ("rounded to nearest", False, False),
        ("AWQ, then nearest", True, False),
        ("GPTQ", False, True),
        ("AWQ, then GPTQ", True, True),
    ):
        print(f"| {label} | {fidelity(task, batches, awq, gptq):.4f} |", flush=True)


if __name__ == "__main__":
    main()
