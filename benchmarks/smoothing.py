"""Activation smoothing (``smooth``, SmoothQuant's migration strength) on all-MiniLM-L6-v2: the
fidelity of the model with every Linear on an int8 kernel that quantizes activations per
tensor, at each strength, in torch (``int8_dynamic``: fbgemm's dynamic Linear, from the
loaded artifact) and in ONNX Runtime (``ort_int8_dynamic``: MatMulInteger, from the ONNX file
the search's export writes, fusions included).

Weights stored at int8 (groups of 64, as ``search_spaces/bert.yaml``), each kernel
re-quantizing them per output channel. Fidelity is ``studies/minilm.yaml``'s metric: the
mean cosine of the mean-pooled sentence embeddings to the fp32 model's, on its 256
validation sentences. The input ranges come from the example sentence alone (what the study,
which names no ``task.calibration``, gives smoothing) or, with ``--calibration``, from 8
batches of the calibration split (512 sentences the metric does not see).

    pip install -e ".[transformers]"
    python -P benchmarks/smoothing.py [--alphas 0 0.5 0.75] [--calibration] [--no-onnx]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, stored_integers
from autosqueeze.artifacts.export import OnnxModel, export_onnx
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples import minilm
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.usercode.metrics import embed, fidelity


def every_linear(model: nn.Module, kernel: str, alpha: float) -> Plan:
    return Plan(
        {
            name: LayerPlan(bits=8, group_size=64, smooth=alpha, kernel=kernel)
            for name, layer in model.named_modules()
            if isinstance(layer, nn.Linear)
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    parser.add_argument("--calibration", action="store_true", help="ranges from 8 batches")
    parser.add_argument("--no-onnx", action="store_true", help="torch's kernel alone")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = minilm.pretrained()
    data, example = minilm.validation(), minilm.example_input()
    calibration = [inputs for inputs, _ in minilm.calibration()] if args.calibration else None
    target = Target("cpu", example, calibration=calibration)
    cpu = torch.device("cpu")
    metric = fidelity(embed(model, data, cpu))
    ranges = "8 calibration batches" if calibration else "the example sentence"
    print(f"all-MiniLM-L6-v2, every Linear int8 (g64) stored; input ranges from {ranges}")
    print("| smooth (alpha) | int8_dynamic (torch) | ort_int8_dynamic (ONNX Runtime) | bytes | s |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for alpha in args.alphas:
            start = time.monotonic()
            plan = every_linear(model, "int8_dynamic", alpha)
            artifact = artifact_bytes(compress(model, plan, target))
            loaded = load_artifact(artifact, copy.deepcopy(model), target)
            in_torch = metric(loaded, data, cpu)
            in_ort = "-"
            if not args.no_onnx:
                plan = every_linear(model, "ort_int8_dynamic", alpha)
                stored = artifact_bytes(compress(model, plan, target))
                decoded = load_artifact(stored, copy.deepcopy(model), target, execution_form=False)
                path = Path(folder) / f"smooth-{alpha}.onnx"
                export_onnx(decoded, plan, stored_integers(stored), example, path)
                in_ort = f"{metric(OnnxModel(path), data, cpu):.4f}"
            seconds = time.monotonic() - start
            print(f"| {alpha} | {in_torch:.4f} | {in_ort} | {len(artifact):,} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
