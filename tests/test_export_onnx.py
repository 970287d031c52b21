"""``export --format onnx``: a front model as an ONNX file that ONNX Runtime runs without
torch, autosqueeze or the model factory, its integer weights stored as integers, giving the
artifact's outputs; ``evaluate`` measures the file in ONNX Runtime."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import study_config, write_yaml

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, stored_integers
from autosqueeze.artifacts.export import export_onnx
from autosqueeze.cli import main
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples.digits import example_input, loaders, pretrained_cnn
from autosqueeze.plans.plan import LayerPlan, Plan

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

PLANS = {
    "int8": {"features.0": LayerPlan(bits=8), "classifier.3": LayerPlan(bits=8)},
    "int4-groups": {"features.2": LayerPlan(bits=4, group_size=32)},  # a conv, grouped
    "int6-pruned-bf16": {"features.5": LayerPlan(bits=6, prune=0.5, kernel="bf16")},
    "int4_weight_only": {
        "classifier.1": LayerPlan(bits=4, group_size=64, kernel="int4_weight_only")
    },
    "int8_dynamic": {"classifier.1": LayerPlan(bits=8, kernel="int8_dynamic")},
    "int8_weight_only": {"classifier.1": LayerPlan(bits=8, kernel="int8_weight_only")},
    "channels": {"features.2": LayerPlan(bits=8, prune_channels=0.5), "classifier.1": LayerPlan()},
    "rank": {"classifier.1": LayerPlan(bits=8, rank=0.25)},
    "shared values": {"classifier.1": LayerPlan(cluster=3)},  # decoded: fp32 in the file
}

RUN_WITHOUT_TORCH = textwrap.dedent(
    """
    import sys
    for name in ("torch", "autosqueeze", "torch_pruning", "transformers"):
        sys.modules[name] = None  # importing them now fails: the file must not need them
    import numpy as np
    import onnxruntime as ort
    inputs = np.load(sys.argv[1], allow_pickle=False)
    outputs = {}
    for name in sys.argv[3:]:
        session = ort.InferenceSession(name + ".onnx", providers=["CPUExecutionProvider"])
        for key in inputs.files:
            feed = {i.name: inputs[f"{key}"] for i in session.get_inputs()}
            outputs[f"{name}/{key}"] = session.run(None, feed)[0]
    np.savez(sys.argv[2], **outputs)
    """
)


def _run_elsewhere(tmp_path, names: list[str], batches: dict[str, np.ndarray]) -> dict:
    """Each ONNX file run on each batch in a fresh interpreter that cannot import torch."""
    np.savez(tmp_path / "in.npz", **batches)
    (tmp_path / "run.py").write_text(RUN_WITHOUT_TORCH)
    subprocess.run(
        [sys.executable, "-I", "run.py", "in.npz", "out.npz", *names], check=True, cwd=tmp_path
    )
    return dict(np.load(tmp_path / "out.npz"))


def test_every_plan_exports_its_integers_and_runs_without_torch(tmp_path):
    x = example_input()
    bigger = loaders()[0][0][:5]
    expected = {}
    for name, layers in PLANS.items():
        plan = Plan(layers)
        data = artifact_bytes(compress(pretrained_cnn(), plan, Target("cpu", x)))
        loaded = load_artifact(data, pretrained_cnn(), Target("cpu", x), execution_form=False)
        notes = export_onnx(loaded, plan, stored_integers(data), x, tmp_path / f"{name}.onnx")
        assert notes[0] == "the model takes any batch size"
        assert not any("kept in fp32" in note for note in notes)
        with torch.no_grad():
            expected[name] = {"one": loaded(x), "five": loaded(bigger)}
        proto = onnx.load(tmp_path / f"{name}.onnx")
        # no exporter's notes: paths, and shape ranges that depend on what the process traced
        # before (an LSTM's file measured 3 bytes more in a search than rebuilt alone)
        assert not proto.graph.metadata_props
        assert not any(node.metadata_props or node.doc_string for node in proto.graph.node)
        stored = {init.name: init.data_type for init in proto.graph.initializer}
        for layer, lp in layers.items():
            if lp.bits < 32 and not lp.rank < 1:  # stored at its width, not as floats
                kind = onnx.TensorProto.INT4 if lp.bits <= 4 else onnx.TensorProto.INT8
                assert stored[f"{layer}.weight::q"] == kind, name
                assert f"{layer}.weight" not in stored
    got = _run_elsewhere(tmp_path, list(PLANS), {"one": x.numpy(), "five": bigger.numpy()})
    for name in PLANS:
        for key, want in expected[name].items():
            have = torch.from_numpy(got[f"{name}/{key}"])
            assert have.shape == want.shape
            assert (have - want).abs().max() <= 1e-4 * want.abs().max(), name


def _bert() -> torch.nn.Module:
    """transformers' BertModel, tiny, seeded: the zoo's (tests/zoo/zoo_models.py)."""
    sys.path.insert(0, str(Path(__file__).parent / "zoo"))
    from zoo_models import build_bert

    return build_bert()


def test_a_head_pruned_transformers_model_exports_with_keyword_inputs(tmp_path):
    model = _bert()
    batch = {
        "input_ids": torch.randint(0, 256, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    plan = Plan(
        {
            "encoder.layer.0.attention.self.query": LayerPlan(prune_heads=0.5, bits=4),
            "encoder.layer.1.intermediate.dense": LayerPlan(bits=8, group_size=32),
            "embeddings.word_embeddings": LayerPlan(bits=8),
        }
    )
    target = Target("cpu", batch)
    data = artifact_bytes(compress(model, plan, target))
    loaded = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
    integers = stored_integers(data)
    notes = export_onnx(loaded, plan, integers, batch, tmp_path / "bert.onnx")
    assert notes[1].startswith(f"{len(integers)} weights stored as integers")  # all of them
    assert not any("kept in fp32" in note for note in notes)
    graph = onnx.load(tmp_path / "bert.onnx").graph
    stored = {i.name for i in graph.initializer}
    assert {f"{key}::q" for key in integers} <= stored and not set(integers) & stored
    table = "embeddings.word_embeddings.weight::q"  # its rows gathered as int8, then scaled
    readers = [node.op_type for node in graph.node if table in node.input]
    assert readers == ["Gather"]
    from autosqueeze.artifacts.export import OnnxModel

    runs = OnnxModel(tmp_path / "bert.onnx")
    for part in ({k: v[:2] for k, v in batch.items()}, {k: v[:3, :7] for k, v in batch.items()}):
        with torch.no_grad():  # another batch, another sentence length
            want = loaded(**part).last_hidden_state
            have = runs(**part)
            have = have[0] if isinstance(have, tuple) else have
        assert (have - want).abs().max() <= 1e-4 * want.abs().max()


def test_export_onnx_and_evaluate_it_from_the_cli(tmp_path, capsys):
    config = write_yaml(tmp_path / "study.yaml", study_config(tmp_path, search={"trials": 3}))
    assert main(["search", str(config), "--no-progress", "--no-sensitivity"]) == 0
    capsys.readouterr()
    out_path = tmp_path / "model.onnx"
    assert (
        main(["export", str(config), "--trial", "1", "--format", "onnx", "-o", str(out_path)]) == 0
    )
    out = capsys.readouterr().out
    assert (
        "onnxruntime.InferenceSession(path)" in out and f"{out_path.stat().st_size:,} bytes" in out
    )
    assert "stored as integers" in out

    artifact = tmp_path / "model.safetensors"
    assert main(["export", str(config), "--trial", "1", "-o", str(artifact)]) == 0
    capsys.readouterr()
    measured = {}
    for path in (artifact, out_path):
        assert main(["evaluate", str(config), "--artifact", str(path), "--json"]) == 0
        measured[path.suffix] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    onnx_run, torch_run = measured[".onnx"], measured[".safetensors"]
    assert onnx_run["size_bytes"] == out_path.stat().st_size
    assert onnx_run["memory_mb"] is None and onnx_run["latency_ms"] > 0
    assert onnx_run["metric"] == pytest.approx(torch_run["metric"], abs=1e-3)


def test_an_onnx_file_pointing_at_other_files_is_refused(tmp_path, capsys):
    """An ONNX tensor can name a file to read its data from; from someone else, that is any
    file on this machine. ``evaluate`` refuses it, naming the tensor, and exits 2."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(16, dtype=np.float32).tobytes())
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4, 4])
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=str(secret))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    hostile = tmp_path / "hostile.onnx"
    onnx.save_model(onnx.helper.make_model(graph), hostile)
    config = write_yaml(tmp_path / "study.yaml", study_config(tmp_path))
    assert main(["evaluate", str(config), "--artifact", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert "tensor 'w' points at data outside the file" in err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    assert main(["evaluate", str(config), "--artifact", str(garbage)]) == 2
    assert "is not a readable ONNX model" in capsys.readouterr().err


@pytest.mark.slow  # the long tests: python -m pytest -m slow
def test_a_study_shipping_to_onnx_runtime_is_measured_there(tmp_path, capsys):
    """``budgets.runtime: onnxruntime``: only ONNX Runtime's kernels are searched, every
    trial is timed as its ONNX export in ONNX Runtime and sized as that file, ONNX Runtime's
    one-call quantizers are measured beside them and shown last, and the front holds the
    files, whose metric and bytes ``evaluate`` reproduces."""
    import csv

    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.records import records
    from autosqueeze.studies.study import open_study
    from autosqueeze.views.study_view import study_view

    config = write_yaml(
        tmp_path / "study.yaml",
        study_config(tmp_path, budgets={"runtime": "onnxruntime"}, search={"trials": 6}),
    )
    # no pass (its layer timings in ONNX Runtime: tests/test_runtime.py): the trials are read
    assert main(["search", str(config), "--no-progress", "--no-sensitivity"]) == 0
    out = capsys.readouterr().out
    assert "in ONNX Runtime" in out
    assert "ort.quantize_dynamic" in out and "ort.quantize_static" in out  # a CNN: both
    assert "ONNX Runtime's quantize_static on every objective" in out  # the summary says
    study = open_study(load_config(config), create=False)
    kernels = {v for t in study.trials for p, v in t.params.items() if p.endswith("kernel")}
    assert kernels and kernels <= {"fp32", "ort_int8_dynamic", "ort_int8_static"}
    baselines = {r.baseline for r in records(study)}
    assert {"ort-int8-static", "ort-int8-dynamic"} <= baselines  # queued on every such study
    view = study_view(load_config(config), config, study)  # the dashboard's and the report's
    assert [p["baseline"] for p in view["one_call"]] == [
        "ort.quantize_dynamic",
        "ort.quantize_static",
    ]
    assert all(p["number"] is None and p["size_bytes"] > 0 for p in view["one_call"])
    with open(tmp_path / "run" / "front.csv") as f:
        front = list(csv.DictReader(f))
    assert front and all(row["memory_mb"] == "" for row in front)
    one_call = [row for row in front if row["baseline"].startswith("ort.")]
    assert [row["baseline"] for row in one_call] == ["ort.quantize_dynamic", "ort.quantize_static"]
    assert front[-2:] == one_call and all(row["trial"] == "" for row in one_call)
    for row in front:
        shipped = tmp_path / "run" / row["artifact"]
        if not row["baseline"].startswith("ort."):
            shipped = shipped.parent / "model.onnx"
        assert shipped.stat().st_size == int(row["size_bytes"])
        assert main(["evaluate", str(config), "--artifact", str(shipped), "--json"]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["size_bytes"] == int(row["size_bytes"])
        assert got["metric"] == pytest.approx(float(row["metric"]), abs=1e-3)


@pytest.mark.parametrize(
    ("budgets", "objectives", "said"),
    [
        ({"device": "cuda"}, None, "runtime onnxruntime runs on the CPU"),
        ({"max_memory_mb": 5.0}, None, "max_memory_mb: memory is measured in torch"),
        ({}, ["metric", "memory_mb"], "objectives: memory_mb is measured in torch"),
    ],
)
def test_what_onnx_runtime_cannot_measure_is_refused_at_load(
    tmp_path, capsys, budgets, objectives, said
):
    overrides = {"budgets": {"runtime": "onnxruntime", **budgets}}
    if objectives:
        overrides["objectives"] = objectives
    config = write_yaml(tmp_path / "study.yaml", study_config(tmp_path, **overrides))
    assert main(["validate", str(config)]) == 2
    assert said in capsys.readouterr().err


def test_the_residual_cnn_with_batchnorm_exports_to_both_formats(tmp_path):
    """A ResNet with BatchNorm and residual adds, channel-pruned and quantized: the ONNX file
    and the program both compute what the artifact does."""
    from autosqueeze.artifacts.export import OnnxModel, export_program
    from autosqueeze.examples import residual

    x = residual.example_input()
    plan = Plan(
        {
            "stage1.0.conv1.0": LayerPlan(bits=4, prune_channels=0.5),
            "down.0": LayerPlan(bits=8, kernel="bf16"),
            "stage2.1.conv2.0": LayerPlan(bits=6, group_size=64, prune=0.3),
            "head": LayerPlan(bits=8, kernel="int8_weight_only"),
        }
    )
    target = Target("cpu", x)
    data = artifact_bytes(compress(residual.pretrained(), plan, target))
    decoded = load_artifact(data, residual.pretrained(), target, execution_form=False)
    deployed = load_artifact(data, residual.pretrained(), target)
    export_onnx(decoded, plan, stored_integers(data), x, tmp_path / "r.onnx")
    export_program(deployed, plan, x, tmp_path / "r.pt2")
    batch = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_fp32, want_deployed = decoded(batch), deployed(batch)
        in_onnx = OnnxModel(tmp_path / "r.onnx")(batch)
        in_program = torch.export.load(tmp_path / "r.pt2").module()(batch)
    assert (in_onnx - want_fp32).abs().max() <= 1e-4 * want_fp32.abs().max()
    assert (in_program - want_deployed).abs().max() <= 1e-3 * want_deployed.abs().max()


@pytest.mark.slow  # the long tests: python -m pytest -m slow
def test_every_kernel_on_a_transformers_bert_exports_to_both_formats(tmp_path):
    """Each kernel the search offers on CPU, on a BERT from transformers' classes: the ONNX
    file computes the decoded weights' outputs; the program computes the deployed model's,
    and only ``int8_dynamic`` is refused there, by layer and kernel."""
    from autosqueeze.artifacts.export import OnnxModel, export_program

    model = _bert()
    batch = {"input_ids": torch.randint(0, 256, (3, 10))}
    target = Target("cpu", batch)
    layers = {
        "embeddings.word_embeddings": LayerPlan(bits=8, kernel="int8_weight_only"),
        "encoder.layer.0.intermediate.dense": LayerPlan(bits=8, kernel="bf16"),
        "encoder.layer.0.output.dense": LayerPlan(bits=8, kernel="int8_weight_only"),
        "encoder.layer.1.intermediate.dense": LayerPlan(bits=4, kernel="int4_weight_only"),
        "encoder.layer.1.output.dense": LayerPlan(bits=8, kernel="int8_dynamic"),
    }
    for name, lp in layers.items():
        plan = Plan({name: lp})
        data = artifact_bytes(compress(model, plan, target))
        decoded = load_artifact(data, copy.deepcopy(model), target, execution_form=False)
        deployed = load_artifact(data, copy.deepcopy(model), target)
        export_onnx(decoded, plan, stored_integers(data), batch, tmp_path / "b.onnx")
        with torch.no_grad():
            want = decoded(**batch).last_hidden_state
            have = OnnxModel(tmp_path / "b.onnx")(**batch)  # one output: last_hidden_state
        assert (have - want).abs().max() <= 1e-4 * want.abs().max(), lp.kernel
        if lp.kernel == "int8_dynamic":
            with pytest.raises(ValueError, match=f"layer '{name}' runs 'int8_dynamic'"):
                export_program(deployed, plan, batch, tmp_path / "b.pt2")
            continue
        export_program(deployed, plan, batch, tmp_path / "b.pt2")
        with torch.no_grad():
            want = deployed(**batch).last_hidden_state
            have = torch.export.load(tmp_path / "b.pt2").module()(**batch).last_hidden_state
        assert (have - want).abs().max() <= 1e-3 * want.abs().max(), lp.kernel
