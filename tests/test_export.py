"""``export --format pt2``: a front model as a torch.export program that plain PyTorch runs,
without autosqueeze, the model factory or Torch-Pruning, giving the artifact's outputs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import study_config, write_yaml
from torch import nn

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact
from autosqueeze.artifacts.export import export_program
from autosqueeze.cli import main
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples.digits import example_input, pretrained_cnn
from autosqueeze.plans.plan import LayerPlan, Plan

PLANS = {
    "fp32": {"classifier.1": LayerPlan(bits=6)},
    "bf16": {"classifier.1": LayerPlan(bits=8, kernel="bf16")},
    "int8_weight_only": {"classifier.1": LayerPlan(bits=8, kernel="int8_weight_only")},
    "int4_weight_only": {"classifier.3": LayerPlan(bits=4, kernel="int4_weight_only")},
    "channels": {"features.2": LayerPlan(bits=8, prune_channels=0.5), "classifier.1": LayerPlan()},
    "rank": {"classifier.1": LayerPlan(bits=8, rank=0.25)},
    "int8 conv": {"features.5": LayerPlan(bits=8, kernel="int8_dynamic")},  # torch._int_mm
    "shared values": {"classifier.1": LayerPlan(cluster=3)},
}

RUN_WITHOUT_AUTOSQUEEZE = textwrap.dedent(
    """
    import sys
    for name in ("autosqueeze", "torch_pruning"):
        sys.modules[name] = None  # importing them now fails: the program must not need them
    import torch
    inputs = torch.load(sys.argv[1])
    outputs = {}
    for name, path in inputs["programs"].items():
        program = torch.export.load(path).module()
        outputs[name] = [program(x) for x in inputs["batches"]]
    torch.save(outputs, sys.argv[2])
    """
)


def _run_elsewhere(tmp_path, programs: dict, batches: list) -> dict:
    """Each program run on each batch in a fresh interpreter that cannot import autosqueeze."""
    torch.save({"programs": programs, "batches": batches}, tmp_path / "in.pt")
    script = tmp_path / "run.py"
    script.write_text(RUN_WITHOUT_AUTOSQUEEZE)
    subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True,
        cwd=tmp_path,
    )
    return torch.load(tmp_path / "out.pt")


def test_each_cpu_kernel_and_structural_plan_exports_and_runs_without_autosqueeze(tmp_path):
    x = example_input()
    bigger = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    expected, programs = {}, {}
    for name, layers in PLANS.items():
        plan = Plan(layers)
        data = artifact_bytes(compress(pretrained_cnn(), plan, Target("cpu", x)))
        loaded = load_artifact(data, pretrained_cnn(), Target("cpu", x))
        path = tmp_path / f"{name}.pt2"
        notes = export_program(loaded, plan, x, path)
        assert notes[0] == "the program takes any batch size"
        programs[name] = str(path)
        with torch.no_grad():
            expected[name] = [loaded(x), loaded(bigger)]
        if name == "fp32":  # stored at 6 bits, run (and so held) at 32
            assert any("stored at 6 bits" in n and "held at 32" in n for n in notes)
    got = _run_elsewhere(tmp_path, programs, [x, bigger])
    for name in PLANS:
        for want, have in zip(expected[name], got[name], strict=True):
            assert have.shape == want.shape
            assert (have - want).abs().max() <= 1e-3 * want.abs().max(), name


def test_a_kernel_torch_export_cannot_trace_is_refused_by_layer_and_kernel(tmp_path):
    x = example_input()
    plan = Plan({"classifier.1": LayerPlan(bits=8, kernel="int8_dynamic")})
    loaded = load_artifact(artifact_bytes(compress(pretrained_cnn(), plan)), pretrained_cnn())
    with pytest.raises(ValueError, match="layer 'classifier.1' runs 'int8_dynamic'"):
        export_program(loaded, plan, x, tmp_path / "m.pt2")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_transformers_model_with_keyword_inputs_exports_with_a_free_batch(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=300,
    )
    model = BertModel(config).eval()
    batch = {
        "input_ids": torch.randint(0, 300, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = Plan.uniform(layers[:4], bits=4, kernel="int4_weight_only")
    target = Target("cpu", batch)
    loaded = load_artifact(artifact_bytes(compress(model, plan, target)), copy.deepcopy(model))
    notes = export_program(loaded, plan, batch, tmp_path / "bert.pt2")
    assert notes == ["the program takes any batch size"]
    program = torch.export.load(tmp_path / "bert.pt2").module()
    for part in ({k: v[:2] for k, v in batch.items()}, {k: v[:3, :7] for k, v in batch.items()}):
        with torch.no_grad():  # another batch, another sentence length
            want = loaded(**part).last_hidden_state
            have = program(**part).last_hidden_state
        assert (have - want).abs().max() <= 1e-3 * want.abs().max()


def test_export_pt2_from_the_cli_names_what_it_wrote_and_refuses_cleanly(tmp_path, capsys):
    config = write_yaml(tmp_path / "study.yaml", study_config(tmp_path, search={"trials": 3}))
    assert main(["search", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    out_path = tmp_path / "model.pt2"
    pt2 = ["export", str(config), "--trial", "1", "--format", "pt2", "-o"]
    assert main([*pt2, str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "torch.export.load(path).module()" in out and f"{out_path.stat().st_size:,} bytes" in out
    program = torch.export.load(out_path).module()
    assert program(example_input()).shape == (1, 10)

    evaluate = ["evaluate", str(config), "--artifact", str(out_path), "--json"]
    assert main(evaluate) == 2  # a program is code: never loaded unasked
    assert "--trust-pickle" in capsys.readouterr().err
    assert main([*evaluate, "--trust-pickle"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    artifact = tmp_path / "model.safetensors"
    assert main(["export", str(config), "--trial", "1", "-o", str(artifact)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(config), "--artifact", str(artifact), "--json"]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["size_bytes"] == out_path.stat().st_size
    assert got["metric"] == pytest.approx(want["metric"], abs=1e-3)
    missing = tmp_path / "no-such-folder" / "m.pt2"
    assert main([*pt2, str(missing)]) == 2
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gpt2", "llama", "bart"])
def test_a_decoder_exports_without_its_key_value_cache(tmp_path, name):
    """transformers' DynamicCache is no pytree: a decoder is traced with use_cache off, says
    so, and its program computes what the artifact does on another batch and length."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parent / "zoo"))
    import zoo_models

    build = getattr(zoo_models, f"build_{name}")
    inputs = getattr(zoo_models, f"data_{name}")()[0][0]
    model = build()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = Plan.uniform(names, bits=8)
    target = Target("cpu", inputs)
    loaded = load_artifact(artifact_bytes(compress(model, plan, target)), build(), target)
    notes = export_program(loaded, plan, inputs, tmp_path / "m.pt2")
    assert "it runs with use_cache=False: it returns no key/value cache" in notes
    assert loaded.config.use_cache  # put back
    program = torch.export.load(tmp_path / "m.pt2").module()
    part = {k: v[:3, :12] for k, v in inputs.items()}
    with torch.no_grad():
        want, have = loaded(**part, use_cache=False)[0], program(**part)[0]  # logits, states
    assert (have - want).abs().max() <= 1e-4 * want.abs().max()


class _EncoderOnPatches(nn.Module):
    """``nn.TransformerEncoder`` on image patches, as torch's own ViT: torch.export traces its
    batches of 1 and of 2 or more into different programs (a guard no one program passes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patches = nn.Conv2d(3, 16, kernel_size=8, stride=8)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.patches(x).flatten(2).transpose(1, 2)).mean(dim=1))


def test_a_program_for_batches_of_one_is_measured_on_larger_batches(tmp_path):
    """The program keeps the example's batch of 1 (and says so); loaded by ``evaluate``, it is
    fed a batch of 7 one sample at a time and answers what the model does on the 7."""
    from autosqueeze.artifacts.export import OnnxModel, export_onnx, load_program

    model = _EncoderOnPatches().eval()
    one, seven = torch.randn(1, 3, 32, 32), torch.randn(7, 3, 32, 32)
    notes = export_program(model, Plan({}), one, tmp_path / "m.pt2")
    assert "the program takes batches of 1, as the example input" in notes
    with torch.no_grad():
        want = model(seven)
        assert (
            load_program(tmp_path / "m.pt2", torch.device("cpu"))(seven) - want
        ).abs().max() < 1e-5
    with pytest.raises(Exception, match="Guard failed"):
        torch.export.load(tmp_path / "m.pt2").module()(seven)  # what a batch of 7 met before

    pytest.importorskip("onnxruntime")
    export_onnx(model, Plan({}), {}, one, tmp_path / "m.onnx")
    shipped = OnnxModel(tmp_path / "m.onnx")  # ONNX has no guards: this one takes any batch
    assert (shipped(seven) - want).abs().max() < 1e-4
    with torch.no_grad():
        assert (shipped(one) - model(one)).abs().max() < 1e-4


def test_export_plan_writes_the_artifact_and_a_program_of_it_or_says_why_not(tmp_path):
    """``export_plan``, ``autosqueeze export`` called from Python: the program is traced from
    the artifact loaded back, so it computes what the artifact's model does."""
    from autosqueeze.problem.task import load_task
    from autosqueeze.results.shipping import NotTraced, export_plan
    from autosqueeze.settings.config import load_config

    task = load_task(load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path))))
    plan = Plan({"features.2": LayerPlan(bits=4, prune_channels=0.5)})
    artifact = export_plan(task, plan, tmp_path / "m.safetensors")
    assert artifact.size_bytes == artifact.artifact_bytes == len(artifact.path.read_bytes())
    program = export_plan(task, plan, tmp_path / "m.pt2", "pt2")
    assert program.artifact_bytes == artifact.size_bytes
    assert program.size_bytes == (tmp_path / "m.pt2").stat().st_size
    x = example_input()
    loaded = load_artifact(artifact.path, pretrained_cnn(), task.target)
    assert torch.allclose(torch.export.load(program.path).module()(x), loaded(x))

    untraceable = Plan({"classifier.1": LayerPlan(bits=8, kernel="int8_dynamic")})
    with pytest.raises(NotTraced) as refused:
        export_plan(task, untraceable, tmp_path / "k.pt2", "pt2")
    assert isinstance(refused.value.cause, ValueError) and refused.value.tracer == "torch.export"
    assert not (tmp_path / "k.pt2").exists()
