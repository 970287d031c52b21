"""Weight sharing against uniform integers, layer by layer, on all-MiniLM-L6-v2.

For each Linear (and the word embeddings) and each width b in 2-4 bits, the layer's weight
alone is stored four ways and decoded back, exactly as the artifact stores and loads it:
uniform b-bit integers with one fp16 scale per row, the same in groups of 64 (the MiniLM
study's space), 2**b shared values (a k-means codebook, ``cluster: b``), and the same with a
codebook per 16 rows (``cluster_rows: 16``). The table gives the model's fidelity (mean
cosine of the sentence embeddings to the original's, on the study's 256 validation
sentences) and the weight's stored bytes; the summary, per width, in how many layers each
sharing form beats each uniform form.

    pip install -e ".[transformers]"
    python benchmarks/weight_sharing.py [--bits 2 3 4] [--layers 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from autosqueeze.compression.codecs import TensorCodec, decode, encode
from autosqueeze.problem.task import load_task
from autosqueeze.settings.config import load_config

CONFIG = Path(__file__).resolve().parent.parent / "studies" / "minilm.yaml"
FORMS = {
    "uniform, scale per row": lambda b: TensorCodec(b),
    "uniform, groups of 64": lambda b: TensorCodec(b, 64),
    "shared values": lambda b: TensorCodec(b, codebook=True),
    "shared, per 16 rows": lambda b: TensorCodec(b, codebook=True, rows=16),
}
SHARED = ("shared values", "shared, per 16 rows")
UNIFORM = tuple(f for f in FORMS if f not in SHARED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers")
    args = parser.parse_args()
    task = load_task(load_config(CONFIG))
    model = task.model
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or n == "embeddings.word_embeddings"
    ][: args.layers]
    rows = []
    wins = {(b, s, u): 0 for b in args.bits for s in SHARED for u in UNIFORM}
    started = time.monotonic()
    for name in names:
        weight = model.get_submodule(name).weight
        original = weight.detach().clone()
        for bits in args.bits:
            cells = {}
            for form, codec in FORMS.items():
                encoded = encode(original, codec(bits))
                with torch.no_grad():
                    weight.copy_(decode(encoded.parts, encoded.meta))
                cells[form] = (task.evaluate_metric(model), encoded.nbytes)
                with torch.no_grad():
                    weight.copy_(original)
            for shared in SHARED:
                for uniform in UNIFORM:
                    wins[bits, shared, uniform] += cells[shared][0] > cells[uniform][0]
            rows.append((name, bits, cells))
        print(f"  {name} ({time.monotonic() - started:.0f} s)", flush=True)
    print("\nall-MiniLM-L6-v2, one layer stored at a time: fidelity (stored bytes of its weight)\n")
    print("| layer | bits | " + " | ".join(FORMS) + " |")
    print("|---|---:|" + "---:|" * len(FORMS))
    for name, bits, cells in rows:
        values = " | ".join(f"{f:.5f} ({n:,})" for f, n in cells.values())
        print(f"| {name} | {bits} | {values} |")
    pairs = [(s, u) for s in SHARED for u in UNIFORM]
    print("\n| bits | layers | " + " | ".join(f"{s} beat {u}" for s, u in pairs) + " |")
    print("|---:|---:|" + "---:|" * len(pairs))
    for bits in args.bits:
        beats = " | ".join(f"{wins[bits, s, u]}" for s, u in pairs)
        print(f"| {bits} | {len(names)} | {beats} |")


if __name__ == "__main__":
    main()
