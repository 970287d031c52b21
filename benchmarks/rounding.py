"""Round-to-nearest against GPTQ (``round_by: gptq``), layer by layer, on all-MiniLM-L6-v2.

Each Linear of the encoder quantized alone (groups of 64 weights per scale) at 2, 3 and 4
bits, rounded to nearest and by GPTQ, then every encoder Linear at once; fidelity (the mean
cosine of the sentence embeddings against the original's, the MiniLM study's metric) on the
study's 256 validation sentences. GPTQ's Hessians come from MiniLM's 512 calibration
sentences (8 batches of 64), which the metric does not see. The pooler is left out: the
sentence embedding is the mean-pooled last hidden state, which it does not touch. Also the
seconds ``compress`` takes for every encoder Linear: rounded to nearest, by GPTQ with nothing
kept (the Hessians' pass and the rounding), with the Hessians kept (the rounding alone), and
with both kept (a trial that repeats another's layers).

    pip install -e ".[transformers]"
    python -P benchmarks/rounding.py [--bits 2 3 4] [--group-size 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch import nn

from autosqueeze.compression.techniques import Target, applied, compress
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import load_task
from autosqueeze.settings.config import load_config

STUDY = Path(__file__).resolve().parent.parent / "studies" / "minilm.yaml"
WAYS = ("nearest", "gptq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    from autosqueeze.examples import minilm

    started = time.monotonic()
    task = load_task(load_config(STUDY))
    model = task.model
    target = Target(calibration=[inputs for inputs, _ in minilm.calibration()])
    names = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder")
    ]

    def plan(layers: list[str], bits: int, way: str) -> Plan:
        return Plan.uniform(layers, bits=bits, group_size=args.group_size, round_by=way)

    seconds = {}
    for label, bits, way in (
        ("rounded to nearest", args.bits[-1], "nearest"),
        ("GPTQ, nothing kept", args.bits[0], "gptq"),  # the Hessians' pass and the rounding
        ("GPTQ, Hessians kept", args.bits[-1], "gptq"),  # the rounding alone
        ("GPTQ, Hessians and rounding kept", args.bits[-1], "gptq"),
    ):
        clock = time.monotonic()
        compress(model, plan(names, bits, way), target)
        seconds[label] = time.monotonic() - clock
        print(f"  compress, every encoder Linear, {label}: {seconds[label]:.1f} s", flush=True)

    def fidelity(layers: list[str], bits: int, way: str) -> float:
        with applied(model, plan(layers, bits, way), target) as probed:
            return float(task.evaluate_metric(probed))

    rows = {}
    for name in [*names, "every encoder Linear"]:
        layers = names if name == "every encoder Linear" else [name]
        rows[name] = {(b, w): fidelity(layers, b, w) for b in args.bits for w in WAYS}
        print(f"  {name}: {rows[name]}", flush=True)

    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s\n")
    head = " | ".join(f"{b}-bit {w}" for b in args.bits for w in WAYS)
    print(f"| layer quantized (groups of {args.group_size}) | {head} |")
    print("|---|" + "---:|" * (2 * len(args.bits)))
    for name, cells in rows.items():
        shown = " | ".join(_cell(cells, b, w) for b in args.bits for w in WAYS)
        print(f"| {name} | {shown} |")
    for b in args.bits:
        wins = sum(cells[b, "gptq"] >= cells[b, "nearest"] for cells in rows.values())
        print(f"\n{b} bits: GPTQ at least as good on {wins} of {len(rows)} rows", end="")
    print("\n\n| compress, every encoder Linear | s |\n|---|---:|")
    for label, s in seconds.items():
        print(f"| {label} | {s:.1f} |")


def _cell(cells: dict[tuple[int, str], float], bits: int, way: str) -> str:
    """A fidelity, in bold where it beats the other way at its bits."""
    value, other = cells[bits, way], [cells[bits, w] for w in WAYS if w != way]
    return f"**{value:.4f}**" if all(value > v for v in other) else f"{value:.4f}"


if __name__ == "__main__":
    main()
