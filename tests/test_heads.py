"""Attention-head pruning on transformers' own classes: whole heads go from the query, key,
value and output projections together (in grouped-query attention, a key/value head with its
group of query heads); the pruned model computes exactly what the original computes with
those heads' contributions zeroed; the artifact loads into the pruned shapes; models whose
attention cannot lose a head cleanly are not offered the knob."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from autosqueeze.artifacts.artifact import load_artifact, save_artifact
from autosqueeze.compression.techniques import TECHNIQUES, Site, Target, compress
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.usercode.metrics import call_model

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "zoo"))
import zoo_models

HEAD = 16  # every zoo transformer: width 64, 4 heads


def _offered(name: str) -> tuple[list[str], Target]:
    model = getattr(zoo_models, f"build_{name}")()
    target = Target("cpu", getattr(zoo_models, f"data_{name}")()[0][0])
    technique = TECHNIQUES["prune_heads"]
    offered = [
        n
        for n, layer in model.named_modules()
        if technique.offer(Site(n, layer, model, target), [0.0, 0.5]) is not None
    ]
    return offered, target


@pytest.mark.parametrize(
    ("name", "block", "projections", "output"),
    [
        (
            "bert",
            "encoder.layer.{}.attention.self",
            ("query", "key", "value"),
            "encoder.layer.{}.attention.output.dense",
        ),
        (
            "hf_vit",
            "layers.{}.attention",
            ("q_proj", "k_proj", "v_proj"),
            "layers.{}.attention.o_proj",
        ),
    ],
)
def test_whole_heads_go_and_the_rest_computes_as_before(name, block, projections, output):
    query = f"{block}.{projections[0]}"
    offered, target = _offered(name)
    assert offered == [query.format(0), query.format(1)]  # one knob per block, on its query

    model = getattr(zoo_models, f"build_{name}")()
    plan = Plan({query.format(0): LayerPlan(prune_heads=0.5)})  # 2 of 4 heads, first block
    pruned = compress(model, plan, target).module
    for projection in projections:
        assert pruned.get_submodule(f"{block}.{projection}".format(0)).weight.shape == (
            2 * HEAD,
            64,
        )
    assert pruned.get_submodule(output.format(0)).weight.shape == (64, 2 * HEAD)
    assert pruned.get_submodule(query.format(1)).weight.shape == (64, 64)  # the other block

    before = model.get_submodule(query.format(0)).weight
    after = pruned.get_submodule(query.format(0)).weight
    kept = [h for h in range(4) if any(torch.equal(before[h * HEAD], row) for row in after)]
    removed = [i for h in range(4) if h not in kept for i in range(h * HEAD, (h + 1) * HEAD)]
    assert len(kept) == 2
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.get_submodule(output.format(0)).weight[:, removed] = 0
    with torch.inference_mode():
        want = call_model(zeroed, target.example_input).last_hidden_state
        got = call_model(pruned, target.example_input).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "offered"),
    [
        ("distilbert", "transformer.layer.{}.attention.q_lin"),
        ("bart", "encoder.layers.0.self_attn.k_proj"),  # keys defined first: the knob is there
    ],
)
def test_blocks_that_hold_their_own_projections_lose_heads_without_the_graph(name, offered):
    found, _ = _offered(name)
    assert offered.format(0) in found
    model = getattr(zoo_models, f"build_{name}")()
    assert not any(TECHNIQUES["prune_heads"].needs_graph(model, n) for n in found)


@pytest.mark.parametrize("name", ["t5", "gpt2", "torch_vit", "whisper", "phi3"])
def test_attention_that_cannot_lose_a_head_cleanly_is_not_offered_it(name):
    """T5 and Whisper split into a fixed number of heads (a narrower projection would give
    narrower heads, another function, or not run); GPT-2 fuses its projections into one
    Conv1D, Phi-3 into one Linear (found by structure, without Torch-Pruning's graph); torch's
    MultiheadAttention holds them as one tensor. validate says why."""
    assert _offered(name)[0] == []
    model = getattr(zoo_models, f"build_{name}")()
    target = Target("cpu", getattr(zoo_models, f"data_{name}")()[0][0])
    reasons = {
        TECHNIQUES["prune_heads"].why_not(Site(n, layer, model, target))
        for n, layer in model.named_modules()
    }
    fixed = "removing a head does not compute what zeroing it does (the block fixes its count)"
    expected = {
        "t5": fixed,
        "whisper": fixed,
        "gpt2": "a fused query-key-value projection: its heads are not cut apart",
        "phi3": "model.layers.0.self_attn.qkv_proj makes the block's projections in one "
        "Linear: its heads stay together",
    }
    if name in expected:
        assert expected[name] in reasons


def test_grouped_query_attention_loses_a_key_value_head_with_its_query_heads(tmp_path):
    """LLaMA, 4 query heads sharing 2 key/value heads: half the heads is one group, one
    key/value head and the two query heads that read it. Torch-Pruning's graph does not
    finish on LLaMA; this route does not use it, nor does loading the artifact."""
    offered, target = _offered("llama")
    assert offered == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    model = zoo_models.build_llama()
    block = "model.layers.0.self_attn"
    pruned = compress(model, Plan({offered[0]: LayerPlan(prune_heads=0.5)}), target).module
    shapes = {
        p: pruned.get_submodule(f"{block}.{p}").weight.shape
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert shapes == {
        "q_proj": (2 * HEAD, 64),
        "k_proj": (HEAD, 64),
        "v_proj": (HEAD, 64),
        "o_proj": (64, 2 * HEAD),
    }
    before, after = (m.get_submodule(f"{block}.k_proj").weight for m in (model, pruned))
    group = 0 if torch.equal(before[HEAD:], after) else 1  # the key/value head that went
    assert torch.equal(before[(1 - group) * HEAD : (2 - group) * HEAD], after)
    query = model.get_submodule(f"{block}.q_proj").weight
    kept_queries = query[(1 - group) * 2 * HEAD : (2 - group) * 2 * HEAD]
    assert torch.equal(pruned.get_submodule(f"{block}.q_proj").weight, kept_queries)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.get_submodule(f"{block}.o_proj").weight[
            :, group * 2 * HEAD : (group + 1) * 2 * HEAD
        ] = 0
    with torch.inference_mode():
        want = call_model(zeroed, target.example_input).logits
        got = call_model(pruned, target.example_input).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

    # a group is the unit: a quarter of 4 heads is half a group, which rounds to none
    same = compress(model, Plan({offered[0]: LayerPlan(prune_heads=0.25)}), target).module
    assert same.get_submodule(f"{block}.k_proj").weight.shape == (2 * HEAD, 64)

    compressed = compress(model, Plan({offered[1]: LayerPlan(prune_heads=0.5, bits=8)}), target)
    save_artifact(compressed, tmp_path / "llama.safetensors")
    loaded = load_artifact(tmp_path / "llama.safetensors", zoo_models.build_llama(), Target("cpu"))
    assert loaded.get_submodule("model.layers.1.self_attn.o_proj").in_features == 2 * HEAD
    with torch.inference_mode():
        want = call_model(compressed.module, target.example_input).logits
        got = call_model(loaded, target.example_input).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)  # fp16 scales as stored


@pytest.mark.slow  # the long tests: python -m pytest -m slow
def test_a_model_torch_pruning_cannot_group_in_time_is_refused_with_the_reason():
    """LLaMA: Torch-Pruning's grouping of a layer runs without end; the first layer past
    the limit stops the analysis, for every layer, with a reason the space shows."""
    model = zoo_models.build_llama()
    target = Target("cpu", zoo_models.data_llama()[0][0])
    layer = "model.layers.0.mlp.gate_proj"
    site = Site(layer, model.get_submodule(layer), model, target)
    with pytest.raises(RuntimeError, match="Torch-Pruning cannot analyse the model.*ran past"):
        TECHNIQUES["prune_channels"].offer(site, [0.0, 0.5])


def test_a_head_pruned_artifact_loads_into_the_pruned_shapes(tmp_path):
    offered, target = _offered("bert")
    plan = Plan(
        {
            offered[0]: LayerPlan(prune_heads=0.25, bits=8),
            offered[1]: LayerPlan(prune_heads=0.75, kernel="int8_dynamic"),
        }
    )
    compressed = compress(zoo_models.build_bert(), plan, target)
    save_artifact(compressed, tmp_path / "bert.safetensors")
    loaded = load_artifact(tmp_path / "bert.safetensors", zoo_models.build_bert(), target)
    assert loaded.get_submodule(offered[0]).out_features == 3 * HEAD
    assert loaded.get_submodule(offered[1]).out_features == HEAD  # one head always stays
    with torch.inference_mode():
        want = call_model(compressed.module, target.example_input).last_hidden_state
        got = call_model(loaded, target.example_input).last_hidden_state
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.99
