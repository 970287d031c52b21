"""Per execution form (kernel) and per layer shape of the examples: speed relative to fp32.

    python benchmarks/kernels.py [--device cpu|cuda] [--rounds 7] [--no-minilm]

The layer shapes are the real ones: each example model (digits CNN, residual CNN, and
all-MiniLM-L6-v2 when the [transformers] extra is installed) runs its example input at batch 1
with hooks that record every Linear / Conv / Embedding and the input it sees. For every
distinct (layer, input) shape, each kernel that fits is timed against fp32 in interleaved
rounds (fp32, kernel, fp32, kernel, ...) so machine drift hits both alike; the table gives
the median over rounds of fp32 time / kernel time (>1 = faster) and the kernel's worst error
relative to the largest fp32 output. When torchao is importable, its int8 dynamic-activation
Linear is measured too ("torchao_int8_dyn"), as the alternative to PyTorch's fbgemm kernel.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from typing import Any

import torch
from torch import nn

from autosqueeze.kernels import KERNELS
from autosqueeze.measure import measure_latency

warnings.filterwarnings("ignore")
LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)


def layer_shapes(device: str, minilm: bool) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(label, layer, input) for each distinct layer shape of the example models."""
    from autosqueeze.examples import digits, residual

    models: list[tuple[str, nn.Module, Any]] = [
        ("digits", digits.pretrained_cnn(), digits.example_input()),
        ("residual", residual.pretrained(), residual.example_input()),
    ]
    if minilm:
        try:
            from autosqueeze.examples import minilm as mini

            models.append(("minilm", mini.pretrained(), mini.example_input()))
        except ImportError:
            print("(MiniLM skipped: pip install -e '.[transformers]')")
    seen: dict[str, tuple[str, nn.Module, torch.Tensor]] = {}
    for name, model, example in models:
        captured: list[tuple[nn.Module, torch.Tensor]] = []

        def record(m: nn.Module, args: Any, out: Any, into: list = captured) -> None:
            into.append((m, args[0]))

        hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, LAYERS)]
        with torch.inference_mode():
            model(**example) if isinstance(example, dict) else model(example)
        for h in hooks:
            h.remove()
        for layer, x in captured:
            label = f"{name} {_describe(layer)} in {list(x.shape)}"
            if label not in seen:
                seen[label] = (label, layer, x.detach().clone())
    return [
        (label, copy.deepcopy(layer).to(device), x.to(device)) for label, layer, x in seen.values()
    ]


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}->{layer.out_features}"
    if isinstance(layer, nn.Conv2d):
        return f"Conv2d {layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]}"
    return f"Embedding {layer.num_embeddings}x{layer.embedding_dim}"


def timed(module: nn.Module, x: torch.Tensor, device: str, repeats: int) -> float:
    """Seconds per call: the median of ``repeats`` after 5 warm-up calls."""
    return measure_latency(module, x, torch.device(device), warmup=5, repeats=repeats) / 1000


def forms(layer: nn.Module, device: str) -> dict[str, nn.Module]:
    out = {
        k.name: k.convert(copy.deepcopy(layer)) for k in KERNELS.values() if k.fits(layer, device)
    }
    if isinstance(layer, nn.Linear) and device == "cpu":
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            wrapped = nn.Sequential(copy.deepcopy(layer))
            quantize_(wrapped, Int8DynamicActivationInt8WeightConfig())
            out["torchao_int8_dyn"] = wrapped
        except Exception:  # noqa: BLE001 - torchao absent or unable here: no column
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    device = args.device
    rows = []
    names: list[str] = []
    for label, layer, x in layer_shapes(device, not args.no_minilm):
        with torch.inference_mode():
            expected = layer(x)
        ratios: dict[str, list[float]] = {}
        errors: dict[str, float] = {}
        candidates = forms(layer, device)
        for name, module in candidates.items():
            with torch.inference_mode():
                got = module(x)
            errors[name] = float((got.float() - expected).abs().max() / expected.abs().max())
        for _ in range(args.rounds):
            for name, module in candidates.items():
                if name == "fp32":
                    continue
                base = timed(layer, x, device, args.repeats)
                ratios.setdefault(name, []).append(base / timed(module, x, device, args.repeats))
        fp32_us = timed(layer, x, device, args.repeats) * 1e6
        row = {"layer": label, "fp32_us": f"{fp32_us:.1f}"}
        for name, values in ratios.items():
            row[name] = f"{statistics.median(values):.2f}x ({errors[name]:.0e})"
            if name not in names:
                names.append(name)
        rows.append(row)
        print(f"  measured {label}", flush=True)
    columns = ["layer", "fp32_us", *names]
    print(f"\nspeed vs fp32 (median of {args.rounds} interleaved rounds) and worst relative error,")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(row.get(c, "-") for c in columns) + " |")


if __name__ == "__main__":
    main()
