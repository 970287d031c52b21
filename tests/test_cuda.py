"""On a CUDA GPU (skipped where there is none, as on CI): searches whose trials are compressed,
loaded, judged and timed on the GPU, on Ray evaluators (one per GPU) and in-process, with
every front model's metric and size reproduced from its file on the GPU. The kernels' CUDA
forms are checked in test_kernels.py, whose cases include CUDA where there is a GPU."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, study_config, write_yaml

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, save_artifact
from autosqueeze.cli import main
from autosqueeze.compression.kernels import kernel_for
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.measuring.measure import measure_latency_beside, measure_memory
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.settings.config import load_config
from autosqueeze.studies.records import records
from autosqueeze.studies.study import SENSITIVITY, open_study
from autosqueeze.usercode.metrics import to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _show(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(text)


def _failed_probes(config: Path) -> dict[str, str]:
    """The sensitivity probes that raised, with why (every knob must apply on the GPU)."""
    study = open_study(load_config(config), create=False)
    return study.user_attrs.get(SENSITIVITY, {}).get("failed", {})


def _front(folder: Path) -> list[dict[str, str]]:
    with open(folder / "front.csv") as f:
        return list(csv.DictReader(f))


def _reproduces(config: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every feasible front model's metric and size, measured again from its file on the GPU."""
    front = [row for row in _front(folder) if row["feasible"] == "True"]
    assert front
    for row in front:
        assert (
            main(["evaluate", str(config), "--artifact", str(folder / row["artifact"]), "--json"])
            == 0
        )
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["metric"] == pytest.approx(float(row["metric"]), abs=1e-3), row
        assert got["size_bytes"] == int(row["size_bytes"])
        assert got["latency_ms"] > 0 and got["memory_mb"] > 0


def test_a_search_on_cuda_runs_one_ray_evaluator_per_gpu_and_its_front_reproduces(tmp_path, capsys):
    config = write_yaml(
        tmp_path / "study.yaml",
        study_config(
            tmp_path,
            budgets={"device": "cuda"},
            compute={"workers": "auto"},
            search={"trials": 12, "seed": 0, "output_dir": str(tmp_path / "run")},
        ),
    )
    assert main(["search", str(config), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    _show(capsys, shown)  # the search's own report, for the log
    assert not _failed_probes(config)  # every knob applies to a model on the GPU
    trials = open_study(load_config(config), create=False).trials
    assert not [t.number for t in trials if t.state.name == "FAIL"]
    workers = {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}
    assert len(workers) == torch.cuda.device_count(), workers  # one evaluator per GPU
    assert all(" gpu " in w for w in workers), workers
    timed = [r.measurements for r in records(open_study(load_config(config), create=False))]
    timed = [m for m in timed if m is not None and m.latency_ms is not None]
    assert timed and all(math.isfinite(m.latency_ms) and m.latency_ms > 0 for m in timed)
    _reproduces(config, tmp_path / "run", capsys)


def test_a_library_transformer_is_searched_on_cuda_in_process(tmp_path, capsys):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "tests" / "zoo"))
    config = write_yaml(
        tmp_path / "study.yaml",
        {
            "name": "llama-cuda",
            "model": {"factory": "zoo_models:build_llama"},
            "task": {"data": "zoo_models:data_llama", "metric": "fidelity"},
            "space": str(REPO / "search_spaces" / "transformer.yaml"),
            "budgets": {"max_metric_drop": 0.02, "device": "cuda"},
            "measure": {"warmup": 2, "repeats": 10},
            "search": {"trials": 10, "seed": 0, "output_dir": str(tmp_path / "run")},
            "compute": {"workers": 0},
        },
    )
    assert main(["search", str(config), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    _show(capsys, shown)
    assert not _failed_probes(config)
    trials = open_study(load_config(config), create=False).trials
    assert not [t.number for t in trials if t.state.name == "FAIL"]
    plans = [r.plan for r in records(open_study(load_config(config), create=False)) if r.plan]
    kernels = {layer.kernel for plan in plans for layer in plan.layers.values()}
    _show(capsys, f"kernels tried: {sorted(k for k in kernels if k)}")
    _reproduces(config, tmp_path / "run", capsys)


def test_a_timing_on_cuda_is_beside_the_original_and_memory_is_the_models_own(capsys):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.Linear(4096, 1024))
    reference = reference.to(CUDA).eval()
    half = copy.deepcopy(reference)
    for i, layer in enumerate(half):
        half[i] = kernel_for("fp16").convert(layer)
    x = torch.randn(64, 1024, device=CUDA)
    timing = measure_latency_beside(half, reference, x, CUDA, warmup=3, repeats=20)
    assert timing.latency_ms > 0 and timing.reference_ms > 0 and timing.attempts >= 1
    weights = sum(p.numel() * p.element_size() for p in reference.parameters()) / 1e6
    assert measure_memory(reference, x, CUDA) >= weights
    both = measure_memory(half, x, CUDA), measure_memory(reference, x, CUDA)
    _show(capsys, f"memory MB: fp16 {both[0]:.2f}, fp32 {both[1]:.2f} (weights {weights:.2f})")
    assert both[0] < 0.75 * both[1]  # the other model on the GPU is not counted


# each CUDA form on every Linear of a library LLaMA, and the least its logits may agree
CUDA_FORMS = {"bf16": 0.999, "fp16": 0.999, "int8_weight_only": 0.999, "int4_weight_only": 0.9}


@pytest.mark.parametrize("kernel", list(CUDA_FORMS))
def test_an_artifact_loads_on_the_gpu_into_each_cuda_kernel(tmp_path, kernel):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "tests" / "zoo"))
    from zoo_models import build_llama, data_llama

    model = build_llama()
    bits = {"int8_weight_only": 8, "int4_weight_only": 4}.get(kernel, 32)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = Plan({name: LayerPlan(bits=bits, kernel=kernel) for name in linears})
    path = tmp_path / "model.safetensors"
    save_artifact(compress(model, plan, Target("cuda")), path)
    loaded = load_artifact(path, build_llama(), Target("cuda"))
    assert {type(loaded.get_submodule(n)).__name__ for n in linears} != {"Linear"}
    assert all(p.device.type == "cuda" for p in loaded.parameters())
    inputs = to_device(data_llama()[0][0], CUDA)
    with torch.inference_mode():
        want = model.to(CUDA)(**inputs).logits.flatten(1).float()
        got = loaded(**inputs).logits.flatten(1).float()
    cosine = torch.nn.functional.cosine_similarity(got, want).min().item()
    assert cosine >= CUDA_FORMS[kernel], f"{kernel}: cosine {cosine:.5f}"


def test_a_two_of_four_pruned_linear_runs_the_sparse_tensor_core_kernel():
    """sparse24: 2:4-pruned fp16 weights in the semi-structured format, against the same
    pruned weights run dense."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)
    ).eval()
    layers = {"0": LayerPlan(prune=0.5, prune_by="2:4", kernel="sparse24")}
    layers["2"] = layers["0"]
    compressed = compress(model, Plan(layers), Target("cuda"))
    artifact = artifact_bytes(compressed)
    skeleton = copy.deepcopy(model)
    loaded = load_artifact(artifact, skeleton, Target("cuda"))
    assert type(loaded[0]).__name__ == "CastLayer"
    dense = load_artifact(artifact, copy.deepcopy(model), Target("cuda"), execution_form=False)
    x = torch.randn(64, 256, device=CUDA)
    with torch.inference_mode():
        got, want = loaded(x).float(), dense(x).float()
    cosine = torch.nn.functional.cosine_similarity(got, want).min().item()
    assert cosine >= 0.999, f"sparse24: cosine {cosine:.5f}"
