"""Per execution form (kernel) and per layer shape of the examples: speed relative to fp32.

    python benchmarks/kernels.py [--device cpu|cuda] [--rounds 7] [--no-minilm] [--resnet] [--llm]

The layer shapes are the real ones: each example model (digits CNN, residual CNN, and
all-MiniLM-L6-v2 when the [transformers] extra is installed) runs its example input at batch 1
with hooks that record every Linear / Conv / Embedding and the input it sees. For every
distinct (layer, input) shape, each kernel that fits is timed against fp32 in interleaved
rounds (fp32, kernel, fp32, kernel, ...) so machine drift hits both alike; the table gives
the median over rounds of fp32 time / kernel time (>1 = faster) and the kernel's worst error
relative to the largest fp32 output. When torchao is importable, its int8 dynamic-activation
Linear is measured too ("torchao_int8_dyn"), as the alternative to PyTorch's fbgemm kernel.
``--resnet`` adds the convolutions of a ResNet-18 at 224x224, batch 1 (the shapes written
out: torchvision is not installed here), post-ReLU inputs, seeded weights. ``--llm`` adds the
Linear layers of a 7B-parameter LLaMA (4096 wide, 11008 in the MLP) at 1 token (decoding,
memory-bound) and 512 tokens (a prompt, compute-bound): what the weight-only kernels are for.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from typing import Any

import torch
from torch import nn

from autosqueeze.compression.kernels import KERNELS
from autosqueeze.measuring.measure import measure_latency

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


# (in, out, kernel, stride, input side): ResNet-18's distinct convolutions at 224x224
RESNET18 = [
    (3, 64, 7, 2, 224),
    (64, 64, 3, 1, 56),
    (64, 128, 3, 2, 56),
    (128, 128, 3, 1, 28),
    (64, 128, 1, 2, 56),
    (128, 256, 3, 2, 28),
    (256, 256, 3, 1, 14),
    (256, 512, 3, 2, 14),
    (512, 512, 3, 1, 7),
]


def resnet_shapes(device: str) -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    found = []
    for cin, cout, k, stride, side in RESNET18:
        layer = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False).eval()
        x = torch.randn(1, cin, side, side).relu()
        label = f"resnet18 Conv2d {cin}->{cout} k{k} s{stride} in {list(x.shape)}"
        found.append((label, layer.to(device), x.to(device)))
    return found


# (in, out) of a LLaMA-7B decoder layer's Linear layers (q/k/v/o, gate/up, down)
LLAMA7B = [(4096, 4096), (4096, 11008), (11008, 4096)]


def llm_shapes(device: str) -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    found = []
    for cin, cout in LLAMA7B:
        layer = nn.Linear(cin, cout, bias=False).eval()
        for tokens in (1, 512):
            label = f"llama-7b Linear {cin}->{cout} in [{tokens}, {cin}]"
            found.append((label, layer.to(device), torch.randn(tokens, cin).to(device)))
    return found


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
    parser.add_argument("--resnet", action="store_true", help="add ResNet-18's convolutions")
    parser.add_argument("--llm", action="store_true", help="add a 7B LLaMA's Linear layers")
    args = parser.parse_args()
    device = args.device
    rows = []
    names: list[str] = []
    shapes = layer_shapes(device, not args.no_minilm)
    shapes += resnet_shapes(device) if args.resnet else []
    shapes += llm_shapes(device) if args.llm else []
    for label, layer, x in shapes:
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
    where = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(
        f"device {device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(row.get(c, "-") for c in columns) + " |")


if __name__ == "__main__":
    main()
