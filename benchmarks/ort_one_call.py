"""Does the front beat ONNX Runtime's one-call quantizers where the model ships? Runs (or
resumes) each study with ``budgets.runtime: onnxruntime``, then times side by side, in one
process and interleaved rounds, the original's fp32 ONNX file, each one-call quantizer's
file the study wrote (``baselines/``) and the front's files that matter against them: the
smallest front model at least as good as the one-call file on every objective, the fastest
and the smallest within the metric budget. Every metric is computed again from its file.

    python -P benchmarks/ort_one_call.py studies/digits-cnn.yaml studies/minilm.yaml \
        [--study-dir-root runs/ort] [--trials N] [--rounds 15] [--workers 0]

(``-P``: benchmarks/kernels.py would otherwise shadow the ``kernels`` package transformers
imports.)

The first two rows are the original's fp32 file as ``torch.onnx.export`` writes it by default
(its graph optimizer on: what a user runs, the study's reference and what the one-call
quantizers are given) and as the search exports an artifact (unoptimized, so each weight
keeps its name: BatchNorm then stays a node of its own).

Prints one table per study (markdown: docs/results.md holds the current ones): each file's
metric, bytes, median milliseconds at the budget's batch size, and its speed against ORT fp32
and against each one-call file (median over rounds of the per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from autosqueeze.artifacts.export import OnnxModel
from autosqueeze.searching.search import run_search
from autosqueeze.settings.config import load_config
from autosqueeze.usercode.metrics import call_model

warnings.filterwarnings("ignore")

REFERENCE = "ORT fp32 (torch.onnx.export's defaults)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--study-dir-root", type=Path, default=Path("runs/ort"))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workers", type=int, default=None, help="override compute.workers")
    args = parser.parse_args()
    for path in args.configs:
        loaded = load_config(path)
        config = loaded.with_overrides(
            study_dir=args.study_dir_root / loaded.name, trials=args.trials, workers=args.workers
        )
        budgets = config.budgets.model_copy(update={"runtime": "onnxruntime"})
        config = config.model_copy(update={"budgets": budgets})
        started = time.perf_counter()
        result = run_search(config, progress=False)
        minutes = (time.perf_counter() - started) / 60
        print(f"\n### {config.name}: {result.ran} trials run, {minutes:.1f} min\n")
        print(_table(result, config, args.rounds))


def _table(result, config, rounds: int) -> str:
    front, task, out = result.front, result.task, config.output_dir
    ref = front.reference
    drop = config.budgets.max_metric_drop or 0.0
    files: dict[str, Path] = {
        REFERENCE: out / "original.onnx",
        "ORT fp32, the search's own export": out / "original-unoptimized.onnx",
    }
    _write_originals(result, files[REFERENCE], files["ORT fp32, the search's own export"])
    for name in front.one_call:
        files[f"ort.{name}"] = out / "baselines" / f"{name}.onnx"
    within = [m for m in front.members if ref.metric - m.measurements.metric <= drop + 1e-12]
    picks = {}
    for name, baseline in front.one_call.items():
        if (best := front.dominating(baseline)) is not None:
            picks[f"trial {best.number}: dominates ort.{name}"] = best
    if within:
        picks[f"trial {{}}: fastest within {drop:g}"] = min(
            within, key=lambda m: m.measurements.latency_ms
        )
        picks[f"trial {{}}: smallest within {drop:g}"] = within[0]
    for label, member in picks.items():
        files[label.format(member.number)] = (
            out / "front" / f"trial-{member.number:04d}" / ("model.onnx")
        )
    threads = config.measure.threads or 0
    models = {label: OnnxModel(path, threads=threads) for label, path in files.items()}
    ms = _interleaved(models, task.example_input, rounds)
    base = ms[REFERENCE]
    one_calls = [label for label in files if label.startswith("ort.")]
    header = ["file", task.config.task.metric, "bytes", "ms", "x ORT fp32"] + [
        f"x {label}" for label in one_calls
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, path in files.items():
        metric = float(task.evaluate_metric(models[label]))
        cells = [
            label,
            f"{metric:.4f}",
            f"{path.stat().st_size:,}",
            f"{statistics.median(ms[label]):.3f}",
            f"{_ratio(base, ms[label]):.2f}x",
        ] + [f"{_ratio(ms[other], ms[label]):.2f}x" for other in one_calls]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_originals(result, reference: Path, own: Path) -> None:
    """The original as the study's reference (``torch.onnx.export``'s defaults) and as the
    search exports a trial's artifact (unoptimized, each weight under its own name)."""
    from autosqueeze.measuring.evaluator import Evaluator

    evaluator = Evaluator(result.task)
    try:
        reference.write_bytes(evaluator.original_in_ort().path.read_bytes())
        uniform = evaluator.artifact(result.space.uniform_plan())
        own.write_bytes(evaluator.shipped_file(uniform)[1])
    finally:
        evaluator.close()


def _interleaved(models: dict[str, OnnxModel], inputs, rounds: int) -> dict[str, list[float]]:
    """Per model, the median milliseconds of each round; every model runs once per round,
    in turn, so a slow moment of the machine hits all of them alike."""
    found: dict[str, list[float]] = {label: [] for label in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(5):
                call_model(model, inputs)
        for _ in range(rounds):
            for label, model in models.items():
                taken = []
                for _ in range(20):
                    start = time.perf_counter()
                    call_model(model, inputs)
                    taken.append(time.perf_counter() - start)
                found[label].append(statistics.median(taken) * 1e3)
    return found


def _ratio(slow: list[float], fast: list[float]) -> float:
    """How many times faster ``fast`` ran than ``slow``: the median of per-round ratios."""
    return statistics.median(a / b for a, b in zip(slow, fast, strict=True))


if __name__ == "__main__":
    main()
