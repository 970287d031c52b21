"""What a shipped file keeps of the search's numbers: MiniLM front-like models as the
artifact (run by autosqueeze in torch), a torch.export program (``.pt2``) and an ONNX model
run by ONNX Runtime, side by side with fp32 in each runtime.

    python benchmarks/export.py [--repeats 30] [--front runs/minilm]

Plans (all-MiniLM-L6-v2, fidelity on the 256 validation sentences):
- ``smallest``: every layer stored at 6 bits in groups of 64, the word embeddings at 4,
  run fp32 (MiniLM's smallest model at fidelity >= 0.99 on the front is of this kind);
- ``fastest``: every Linear stored at 8 bits and run by ``int8_weight_only``, the word
  embeddings at 6 bits (the ``int8_dynamic`` kernel, faster still in torch, cannot be
  traced by torch.export and is refused there: the table says so);
- ``heads``: ``smallest`` with 2 of the 12 heads of each attention block removed.

With ``--front DIR`` (a MiniLM study's output folder), the smallest and the fastest models of
its front at fidelity >= 0.99 are taken instead, from their artifacts.

Per plan and format: bytes on disk, fidelity in that runtime, and batch-1 latency timed in
interleaved rounds beside the fp32 model in the same runtime (``measure_latency_beside``),
as a speedup over it. One thread, as the search's evaluators time. Prints one markdown
table (the front's kept in docs/results.md, the hand plans' in CHANGELOG.md).
"""

from __future__ import annotations

import argparse
import copy
import csv
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, read_plan, stored_integers
from autosqueeze.artifacts.export import OnnxModel, export_onnx, export_program
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.measuring.measure import measure_latency_beside
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.usercode.metrics import embed, fidelity

warnings.filterwarnings("ignore")
CPU = torch.device("cpu")


def plans(model: nn.Module) -> dict[str, Plan]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    words = "embeddings.word_embeddings"
    queries = [n for n in linears if n.endswith("attention.self.query")]
    smallest = {n: LayerPlan(bits=6, group_size=64) for n in linears}
    smallest[words] = LayerPlan(bits=4, group_size=64)
    fastest = {n: LayerPlan(bits=8, kernel="int8_weight_only") for n in linears}
    fastest[words] = LayerPlan(bits=6, group_size=64)
    heads = dict(smallest) | {n: smallest[n].replace(prune_heads=2 / 12) for n in queries}
    return {
        "fp32": Plan({}),
        "smallest": Plan(smallest),
        "fastest": Plan(fastest),
        "heads": Plan(heads),
    }


def front_plans(folder: Path) -> dict[str, Plan]:
    """The smallest and the fastest front models at fidelity >= 0.99 of a study's folder."""
    with open(folder / "front.csv") as f:
        rows = [r for r in csv.DictReader(f) if float(r["metric"]) >= 0.99 and r["artifact"]]
    smallest = min(rows, key=lambda r: int(r["size_bytes"]))
    fastest = min(rows, key=lambda r: float(r["latency_ms"]))
    return {
        "fp32": Plan({}),
        **{
            f"{kind} (trial {row['trial']})": read_plan(folder / row["artifact"])
            for kind, row in (("smallest", smallest), ("fastest", fastest))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--front", type=Path, help="a MiniLM study's output folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from autosqueeze.examples import minilm

    model, example = minilm.pretrained(), minilm.example_input()
    target = Target("cpu", example)
    batches = minilm.validation()
    score = fidelity(embed(model, batches, CPU))
    folder = Path(tempfile.mkdtemp(prefix="autosqueeze-export-"))
    forms: dict[str, dict[str, tuple[int, nn.Module | None, str]]] = {}
    chosen = front_plans(args.front) if args.front else plans(model)
    for name, plan in chosen.items():
        data = artifact_bytes(compress(model, plan, target))
        forms[name] = {
            "artifact": (len(data), load_artifact(data, copy.deepcopy(model), target), "")
        }
        try:
            path = folder / f"{name}.pt2"
            export_program(forms[name]["artifact"][1], plan, example, path)
            forms[name]["pt2"] = (path.stat().st_size, torch.export.load(path).module(), "")
        except ValueError as exc:
            forms[name]["pt2"] = (0, None, str(exc).split(":")[0])
        path = folder / f"{name}.onnx"
        fp32 = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
        export_onnx(fp32, plan, stored_integers(data), example, path)
        forms[name]["onnx"] = (path.stat().st_size, OnnxModel(path), "")
    print(
        "| plan | format | bytes | fidelity | batch-1 ms | speedup over fp32 in the same runtime |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, by_format in forms.items():
        for form, (size, runs, why) in by_format.items():
            if runs is None:
                print(f"| {name} | {form} | - | - | - | refused: {why} |")
                continue
            reference = forms["fp32"][form][1]
            timing = measure_latency_beside(
                runs, reference, example, CPU, warmup=5, repeats=args.repeats, threads=1
            )
            print(
                f"| {name} | {form} | {size:,} | {score(runs, batches, CPU):.4f} | "
                f"{timing.latency_ms:.2f} | {timing.speedup:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
