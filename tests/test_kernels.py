"""Execution forms: each kernel stays close to fp32, survives the artifact round trip, and
really holds its weights in fewer bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, read_plan, save_artifact
from autosqueeze.compression.kernels import KERNELS, kernel_for
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples.digits import example_input, loaders, pretrained_cnn
from autosqueeze.measuring.measure import measure_memory
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searchspace.space import build_space

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Worst |error| relative to the largest |output| of fp32, per kernel: bf16 keeps 8 mantissa
# bits; the int8 forms add a scale/2 weight error per row; int4 groups of 32 add more.
BOUNDS = {
    "fp32": 0.0,
    "bf16": 0.02,
    "fp16": 0.002,
    "int8_dynamic": 0.03,
    "int8_weight_only": 0.03,
    "int4_weight_only": 0.15,
    # ONNX Runtime's integer kernels, as torch runs them for the sensitivity pass's probes
    # (its dynamic int8 and int4 weight-only forms); in ONNX Runtime: tests/test_onnx_forms.py
    "ort_int8_dynamic": 0.03,
    "ort_int8_static": 0.03,
    "ort_int4": 0.15,
}

LAYERS = {
    "linear": (nn.Linear(70, 40), torch.randn(3, 5, 70)),  # shapes the int kernels must pad
    "linear-batch1": (nn.Linear(1024, 128), torch.randn(1, 1024)),
    "narrow": (nn.Linear(5, 10), torch.randn(1, 5)),  # crashed _weight_int8pack_mm unpadded
    "conv": (nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 8, 8)),
    # inputs after a ReLU (>= 0): torch.ao's dynamic conv returned relu(conv(x)) on them
    "conv-after-relu": (nn.Conv2d(8, 16, 3, padding=1), torch.rand(2, 8, 8, 8)),
    "conv-strided-dilated": (
        nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(2, 1), dilation=2),
        torch.randn(1, 6, 11, 9),
    ),
    "conv-1x1-unbatched": (nn.Conv2d(12, 4, 1, bias=False), torch.randn(12, 5, 5)),
    "embedding": (nn.Embedding(100, 24), torch.randint(0, 100, (2, 7))),
}


def _cases():
    for device in DEVICES:  # CUDA's cases run where there is a GPU
        for layer_name, (layer, _) in LAYERS.items():
            for kernel in KERNELS.values():
                if kernel.fits(layer, device):
                    case = f"{device}-{layer_name}-{kernel.name}"
                    yield pytest.param(device, layer_name, kernel.name, id=case)


@pytest.mark.parametrize(("device", "layer_name", "kernel_name"), list(_cases()))
def test_each_kernel_is_close_to_fp32(device, layer_name, kernel_name):
    torch.manual_seed(0)
    layer, x = LAYERS[layer_name]
    layer, x = _copy(layer).to(device), x.to(device)
    with torch.inference_mode():
        expected = layer(x)
        got = kernel_for(kernel_name).convert(_copy(layer))(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert got.device == expected.device
    error = (got - expected).abs().max() / expected.abs().max()
    assert error <= BOUNDS[kernel_name], f"{kernel_name} on {device} {layer_name}: {error:.4f}"


def test_cpu_offers_the_cpu_kernels_only():
    linear = nn.Linear(64, 64)
    offered = {k.name for k in KERNELS.values() if k.fits(linear, "cpu") and "torch" in k.runtimes}
    assert offered == {"fp32", "bf16", "int8_dynamic", "int8_weight_only", "int4_weight_only"}
    assert not KERNELS["fp16"].fits(linear, "cpu")
    assert KERNELS["int8_dynamic"].fits(nn.Conv2d(3, 3, 3), "cpu")
    for conv in (
        nn.Conv2d(4, 4, 3, groups=2),  # grouped and depthwise: not one GEMM
        nn.Conv2d(3, 3, 3, padding="same"),
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(3, 3, 3),
    ):
        assert not KERNELS["int8_dynamic"].fits(conv, "cpu"), conv


PLAN = Plan(
    {
        "features.2": LayerPlan(kernel="bf16"),
        "features.5": LayerPlan(bits=8, kernel="int8_dynamic"),
        "classifier.1": LayerPlan(bits=8, kernel="int8_dynamic", rank=0.5),
        "classifier.3": LayerPlan(bits=4, kernel="int4_weight_only"),
    }
)


def test_the_artifact_loads_into_the_planned_execution_form(tmp_path):
    path = tmp_path / "model.safetensors"
    save_artifact(compress(pretrained_cnn(), PLAN), path)
    assert read_plan(path) == PLAN
    loaded = load_artifact(path, pretrained_cnn(), Target("cpu"))
    kinds = {name: type(m).__qualname__ for name, m in loaded.named_modules()}
    assert kinds["features.2"] == "CastLayer"
    assert kinds["classifier.3"] == "Int4WeightOnlyLinear"
    assert kinds["features.5"] == "Int8DynamicConv2d"
    assert loaded.features[5].codes.dtype == torch.int8
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(loaded.classifier[1][0], dynamic)  # both halves of the factorized layer
    assert isinstance(loaded.classifier[1][1], dynamic)
    x = loaders()[0][0]
    with torch.inference_mode():
        again = load_artifact(path, pretrained_cnn(), Target("cpu"))(x)
        torch.testing.assert_close(loaded(x), again, atol=0, rtol=0)  # deterministic form
        agree = (loaded(x).argmax(1) == pretrained_cnn()(x).argmax(1)).float().mean()
    assert agree > 0.95


def test_memory_counts_the_weights_at_their_execution_width():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    x = torch.randn(1, 512)
    fp32 = measure_memory(model, x, CPU)
    assert fp32 >= 2 * 512 * 512 * 4 / 1e6  # the two fp32 weights at least
    int8 = _converted(model, "int8_weight_only")
    int4 = _converted(model, "int4_weight_only")
    assert measure_memory(int8, x, CPU) < 0.3 * fp32
    assert measure_memory(int4, x, CPU) < 0.7 * measure_memory(int8, x, CPU)  # + group scales


def test_memory_sees_the_activations_of_the_forward_pass():
    wide = nn.Sequential(nn.Linear(8, 4096), nn.ReLU(), nn.Linear(4096, 8))
    small_batch = measure_memory(wide, torch.randn(1, 8), CPU)
    big_batch = measure_memory(wide, torch.randn(256, 8), CPU)
    assert big_batch - small_batch >= 256 * 4096 * 4 / 1e6 * 0.9  # one hidden activation


def test_memory_is_of_the_loaded_artifact_in_its_execution_form():
    """What a trial measures is the loaded artifact: its int8/int4 layers hold packed
    weights, so it needs less than the same plan applied but not yet deployed (fp32)."""
    x = example_input()
    compressed = compress(pretrained_cnn(), PLAN)
    loaded = load_artifact(artifact_bytes(compressed), pretrained_cnn())
    original = measure_memory(pretrained_cnn(), x, CPU)
    undeployed = measure_memory(compressed.module, x, CPU)
    deployed = measure_memory(loaded, x, CPU)
    assert deployed < 0.7 * undeployed and deployed < 0.7 * original


def _converted(model: nn.Sequential, kernel: str) -> nn.Sequential:
    return nn.Sequential(
        *(kernel_for(kernel).convert(m) if isinstance(m, nn.Linear) else m for m in _copy(model))
    )


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("kernel_name", ["int8_dynamic", "int8_weight_only", "int4_weight_only"])
def test_gpt2_conv1d_projections_run_the_linear_kernels(tmp_path, kernel_name):
    """Hugging Face's Conv1D (all of GPT-2's projections) is a Linear stored transposed: the
    Linear kernels are offered on it, and its artifact loads into them and scores as measured."""
    from conftest import tiny_gpt2

    model, config, ids = tiny_gpt2()  # skips without transformers
    import transformers

    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(names) == 4 and all(
        KERNELS[kernel_name].fits(model.get_submodule(n), "cpu") for n in names
    )
    space = build_space(model, REPO / "search_spaces" / "transformer.yaml", Target("cpu", ids))
    for name in names:  # the space offers them too (it withheld them as "own forward" before)
        assert "kernel" in space.layers[name].searched, space.withheld.get(name)
    path = tmp_path / "gpt2.safetensors"
    save_artifact(compress(model, Plan.uniform(names, bits=8, kernel=kernel_name)), path)
    fresh = transformers.GPT2Model(config).eval()
    loaded = load_artifact(path, fresh, Target(example_input={"input_ids": ids}))
    assert all(type(loaded.get_submodule(n)).__name__ != "Conv1D" for n in names)
    with torch.no_grad():
        got = loaded(input_ids=ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def test_the_deprecated_dynamic_int8_path_is_still_in_torch():
    """``int8_dynamic`` is torch.ao's fbgemm dynamic Linear: deprecated (pytorch/ao#2259),
    and still the fastest int8 Linear on this CPU (torchao's is ~10x slower here, see
    docs/techniques.md). This fails, saying what to do, the day torch drops it."""
    import importlib.util

    why = (
        "torch no longer has torch.ao's dynamic quantized Linear: give kernels.DynamicInt8 a "
        "maintained backend (benchmarks/kernels.py measures the candidates) or retire it"
    )
    assert importlib.util.find_spec("torch.ao.nn.quantized.dynamic") is not None, why
    layer = nn.Linear(64, 32)
    converted = KERNELS["int8_dynamic"].convert(layer)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        error = (converted(x) - layer(x)).abs().max() / layer(x).abs().max()
    assert error < 0.05, why
