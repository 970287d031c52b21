"""A BERT-style model end to end: dict inputs, dict outputs, Embedding knobs, knobs tied
across layers, and the label-free fidelity metrics."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import study_config, write_yaml
from tiny_bert import build, data

from autosqueeze.artifacts.artifact import load_artifact, save_artifact
from autosqueeze.cli import main
from autosqueeze.compression.techniques import compress
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study
from autosqueeze.usercode.metrics import embed, fidelity, neighbour_overlap

SPACE = {
    "rules": [
        {
            "types": ["Embedding"],
            "name": "embeddings",
            "share": "all",
            "knobs": {"bits": [4, 8, 32]},
        },
        {
            "types": ["Linear"],
            "names": ["*.attention.self.*"],
            "name": "attention",
            "share": r"layer\.(\d+)\.",
            "knobs": {"bits": [4, 8, 32], "rank": [0.25, 1.0]},
        },
        {
            "types": ["Linear"],
            "knobs": {"bits": [4, 8, 32], "prune": {"low": 0, "high": 0.5, "step": 0.25}},
        },
    ]
}


def test_tied_knobs_make_one_parameter_per_group(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    space = build_space(build(), path)
    names = set(space.distributions)
    assert {
        "embeddings.bits",
        "attention[0].bits",
        "attention[1].bits",
        "attention[0].rank",
        "encoder.layer.0.intermediate.dense.prune",
    } <= names
    assert not any(n.startswith("encoder.layer.0.attention.self") for n in names)
    assert len(names) == 1 + 2 * 2 + 6 * 2  # embeddings; 2 blocks x 2 tied; 6 Linears x 2
    params = {
        n: (d.choices[0] if hasattr(d, "choices") else d.low)
        for n, d in space.distributions.items()
    }
    plan = space.plan({**params, "attention[1].bits": 8})
    block1 = [plan.layers[f"encoder.layer.1.attention.self.{p}"] for p in ("query", "key", "value")]
    assert {lp.bits for lp in block1} == {8} and {lp.rank for lp in block1} == {0.25}
    assert plan.layers["embeddings.word_embeddings"].bits == 4
    assert space.params_for(plan) == {**params, "attention[1].bits": 8}
    apart = Plan({**plan.layers, "encoder.layer.1.attention.self.key": LayerPlan(bits=32)})
    assert space.params_for(apart) is None  # tied layers cannot differ


def test_embeddings_quantize_and_dict_models_round_trip(tmp_path):
    model = build()
    plan = Plan(
        {
            "embeddings.word_embeddings": LayerPlan(bits=4),
            "encoder.layer.0.attention.self.query": LayerPlan(bits=8, rank=0.25),
            "encoder.layer.1.intermediate.dense": LayerPlan(bits=4, prune=0.5),
        }
    )
    path = tmp_path / "bert.safetensors"
    fp32 = save_artifact(compress(model, Plan()), tmp_path / "fp32.safetensors")
    size = save_artifact(compress(model, plan), path)
    assert size < fp32 * 0.8  # the 200 x 64 embedding at 4 bits is most of the saving
    loaded = load_artifact(path, build())
    inputs = data()[0][0]
    out = loaded(**inputs)
    assert set(out) == {"last_hidden_state", "pooler_output"}
    reference = embed(model, data(), torch.device("cpu"))
    cosine = fidelity(reference)(loaded, data(), torch.device("cpu"))
    assert 0.9 < cosine < 1.0
    assert fidelity(reference)(model, data(), torch.device("cpu")) == pytest.approx(1.0)
    assert neighbour_overlap(reference)(model, data(), torch.device("cpu")) == 1.0
    assert 0.0 <= neighbour_overlap(reference)(loaded, data(), torch.device("cpu")) <= 1.0


def test_search_a_bert_style_model_by_fidelity(tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    config = write_yaml(
        tmp_path / "bert.yaml",
        study_config(
            tmp_path,
            name="tiny-bert",
            model={"factory": "tiny_bert:build"},
            task={"data": "tiny_bert:data", "metric": "fidelity"},
            space="space.yaml",
            budgets={"max_metric_drop": 0.05, "max_size_mb": None},
            search={"trials": 6, "output_dir": str(tmp_path / "run")},
        ),
    )
    assert main(["search", str(config), "--no-progress"]) == 0
    trials = open_study(load_config(config), create=False).trials
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert trials[0].user_attrs["metric"] == pytest.approx(1.0)  # the original vs itself
    assert all(0 < t.user_attrs["metric"] <= 1.0 + 1e-6 for t in trials)
    out = capsys.readouterr().out
    assert "Smallest model within 0.05 fidelity of the original" in out
    front = json.loads(open_front(config, capsys))["front"]
    exported = tmp_path / "best.safetensors"
    trial = str(front[0]["trial"])
    assert main(["export", str(config), "--trial", trial, "-o", str(exported)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(config), "--artifact", str(exported), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["metric"] == pytest.approx(front[0]["metric"], abs=1e-6)


def open_front(config, capsys) -> str:
    assert main(["front", str(config), "--json"]) == 0
    return capsys.readouterr().out


def test_a_bert_style_model_prunes_ffn_neurons_and_runs_kernels(tmp_path):
    """Dict inputs and outputs: structured pruning is offered on the FFN's first layer and
    the (single-head) attention projections, never on layers tied to the hidden size (the
    outputs); the kernels convert its Linears and Embeddings; the artifact reloads into the
    same pruned, converted model."""
    from autosqueeze.compression.techniques import Target

    model = build()
    example = data(samples=1, batch=1)[0][0]
    target = Target("cpu", example)
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {"types": ["Embedding"], "knobs": {"kernel": ["fp32", "int8_weight_only"]}},
                    {
                        "types": ["Linear"],
                        "knobs": {
                            "prune_channels": [0.0, 0.5],
                            "kernel": ["fp32", "int8_dynamic", "int4_weight_only"],
                        },
                    },
                ]
            }
        )
    )
    space = build_space(model, path, target)
    pruned = {n for n, k in space.layers.items() if "prune_channels" in k.searched}
    assert pruned == {
        f"encoder.layer.{i}.{name}"
        for i in (0, 1)
        for name in (
            "intermediate.dense",
            *(f"attention.self.{p}" for p in ("query", "key", "value")),
        )
    }
    plan = Plan(
        {
            "encoder.layer.0.intermediate.dense": LayerPlan(
                prune_channels=0.5, kernel="int8_dynamic"
            ),
            "encoder.layer.1.output.dense": LayerPlan(bits=4, kernel="int4_weight_only"),
            "embeddings.word_embeddings": LayerPlan(bits=8, kernel="int8_weight_only"),
        }
    )
    compressed = compress(model, plan, target)
    assert compressed.module.encoder.layer[0].output.dense.in_features == 2 * 64  # 256 -> 128
    artifact = tmp_path / "bert.safetensors"
    save_artifact(compressed, artifact)
    loaded = load_artifact(artifact, build(), target)
    batches, cpu = data(), torch.device("cpu")
    assert fidelity(embed(model, batches, cpu))(loaded, batches, cpu) > 0.95
    again = load_artifact(artifact, build(), target)
    torch.testing.assert_close(embed(loaded, batches, cpu), embed(again, batches, cpu))


def test_a_mixtures_experts_held_as_3d_tensors_are_stored_at_their_bits(tmp_path):
    """transformers holds a mixture's experts as 3-D tensors of one module (Mixtral's
    ``gate_up_proj``, ``down_proj``), not as Linears: the transformer space's last rule gives
    any module's own weight matrices bits and prune, and the file stores them at their bits."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tests" / "zoo"))
    import zoo_models

    model = zoo_models.build_mixtral()
    space = build_space(model, REPO / "search_spaces" / "transformer.yaml")
    experts = "model.layers.0.mlp.experts"
    assert set(space.layers[experts].searched) == {"bits", "prune"}
    fp32 = save_artifact(compress(model, Plan()), tmp_path / "fp32.safetensors")
    four = Plan({f"model.layers.{i}.mlp.experts": LayerPlan(bits=4) for i in (0, 1)})
    size = save_artifact(compress(model, four), tmp_path / "experts.safetensors")
    expert_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    assert fp32 - size > 0.8 * expert_bytes  # 4 of 32 bits, plus a scale per 64 weights
    loaded = load_artifact(tmp_path / "experts.safetensors", zoo_models.build_mixtral())
    inputs = zoo_models.data_mixtral()[0][0]
    with torch.inference_mode():
        want, got = model(**inputs).logits, loaded(**inputs).logits
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.99
