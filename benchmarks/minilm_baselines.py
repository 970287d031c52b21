"""all-MiniLM-L6-v2: autosqueeze's packed artifacts beside the baselines a user tries first,
measured in one run on this machine (batch size 1, CPU).

Rows: the fp32 model; PyTorch dynamic int8 on every Linear (``quantize_dynamic``, shipped as
``torch.save`` of its state dict); an fp16 cast (shipped as safetensors); uniform and mixed
autosqueeze plans (stored bits, and execution kernels), loaded back from their artifacts;
and, with ``--study-dir``, the smallest and the fastest front model of a finished
``studies/minilm.yaml`` search with fidelity >= 0.99.

Fidelity is the mean cosine similarity of the mean-pooled sentence embeddings to the fp32
model's, on the study's validation sentences. Latency: this VM's speed drifts (the same
model measured 7.3 and 11.5 ms minutes apart), so every model is timed in ``--rounds``
interleaved rounds and the median is reported.

    pip install -e ".[transformers]"
    python benchmarks/minilm_baselines.py [--study-dir studies/runs/minilm]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from autosqueeze.artifacts.artifact import load_artifact
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.measure import measure_latency
from autosqueeze.plans.plan import Plan
from autosqueeze.problem.task import Task, load_task
from autosqueeze.results.front import compute_front
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study

CONFIG = Path(__file__).resolve().parent.parent / "studies" / "minilm.yaml"


def plans(task: Task, study_dir: Path | None) -> dict[str, Plan]:
    space = build_space(task.model, task.config.space, task.target)

    def linears_run(kernel: str, bits: int) -> Plan:
        return Plan(
            {
                name: lp.replace(kernel=kernel)
                if isinstance(task.model.get_submodule(name), nn.Linear)
                else lp
                for name, lp in space.uniform_plan(bits=bits).layers.items()
            }
        )

    def with_embeddings(bits: int, rest: int) -> Plan:
        layers = dict(space.uniform_plan(bits=rest).layers)
        name = "embeddings.word_embeddings"
        layers[name] = layers[name].replace(bits=bits)
        return Plan(layers)

    chosen = {
        "autosqueeze fp32 artifact": space.uniform_plan(),
        "autosqueeze int8 (g64), every layer": space.uniform_plan(bits=8),
        "autosqueeze int6 (g64), every layer": space.uniform_plan(bits=6),
        "autosqueeze embeddings int4, rest int6": with_embeddings(4, 6),
        "autosqueeze int8 (g64) stored, Linears run int8_dynamic": linears_run("int8_dynamic", 8),
        "autosqueeze int8 (g64) stored, Linears run bf16": linears_run("bf16", 8),
        "autosqueeze int6 (g64) stored, Linears run bf16": linears_run("bf16", 6),
    }
    if study_dir:
        config = task.config.with_overrides(study_dir=study_dir)
        front = compute_front(open_study(config, create=False), config.objectives)
        ok = [m for m in front.members if m.measurements and m.measurements.metric >= 0.99]
        if ok:
            best = min(ok, key=lambda m: m.measurements.size_bytes)
            chosen[f"autosqueeze search: smallest front model (trial {best.number})"] = best.plan
            fast = min(ok, key=lambda m: m.measurements.latency_ms)
            chosen[f"autosqueeze search: fastest front model (trial {fast.number})"] = fast.plan
    return chosen


def candidates(
    task: Task, folder: Path, study_dir: Path | None
) -> dict[str, tuple[nn.Module, int]]:
    """name -> (the model as it runs, bytes of what would be shipped)."""
    out: dict[str, tuple[nn.Module, int]] = {}
    evaluator = Evaluator(task, workdir=folder)
    for i, (name, plan) in enumerate(plans(task, study_dir).items()):
        path = folder / f"plan{i}.safetensors"
        size = evaluator.build(plan, path)
        out[name] = (load_artifact(path, copy.deepcopy(task.model), task.target), size)
        if i == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated, and still what users try first
                dynamic = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(task.model), {nn.Linear}, dtype=torch.qint8
                )
            torch.save(dynamic.state_dict(), folder / "dynamic.pt")
            out["PyTorch dynamic int8, every Linear"] = (
                dynamic,
                (folder / "dynamic.pt").stat().st_size,
            )
            half = copy.deepcopy(task.model).half()
            save_file({k: v.contiguous() for k, v in half.state_dict().items()}, folder / "h.st")
            out["fp16 cast"] = (half, (folder / "h.st").stat().st_size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-dir", type=Path, help="a finished minilm study to add")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    args = parser.parse_args()
    task = load_task(load_config(CONFIG))
    measure = task.config.measure
    with tempfile.TemporaryDirectory() as folder:
        models = candidates(task, Path(folder), args.study_dir)
        fidelity = {name: task.evaluate_metric(model) for name, (model, _) in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, (model, _) in models.items():
                times[name].append(
                    measure_latency(
                        model,
                        task.example_input,
                        task.device,
                        warmup=measure.warmup,
                        repeats=measure.repeats,
                    )
                )
    latency = {name: statistics.median(t) for name, t in times.items()}
    base_name = "autosqueeze fp32 artifact"
    base_size, base_latency = models[base_name][1], latency[base_name]
    print(f"all-MiniLM-L6-v2, batch 1, CPU, latency = median of {args.rounds} interleaved rounds")
    print("| model | fidelity (mean cosine) | size MB | vs fp32 | latency ms | speed vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (_, size) in models.items():
        spread = f"{min(times[name]):.1f}-{max(times[name]):.1f}"
        print(
            f"| {name} | {fidelity[name]:.4f} | {size / 1e6:.2f} | {base_size / size:.2f}x "
            f"smaller | {latency[name]:.2f} ({spread}) | {base_latency / latency[name]:.2f}x |"
        )


if __name__ == "__main__":
    main()
