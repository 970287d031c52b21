import copy

import pytest
import torch
from optuna.distributions import CategoricalDistribution
from torch import nn

from autosqueeze.common.errors import UserError
from autosqueeze.compression.techniques import TECHNIQUES, Site, Target, applied, compress, rebuild
from autosqueeze.compression.techniques.factorize import helps, rank_for
from autosqueeze.compression.techniques.prune import prune_by_magnitude
from autosqueeze.plans.plan import LayerPlan, Plan


def test_techniques_apply_in_the_documented_order():
    order = [
        "prune_channels",
        "prune_heads",
        "rank",
        "separable",
        "prune",
        "smooth",
        "bits",
        "cluster",
        "kernel",
    ]
    assert list(TECHNIQUES) == order


def test_linear_factorization_shapes_and_exact_reconstruction_at_full_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    low = compress(model, Plan({"0": LayerPlan(rank=0.25)})).module
    first, second = low[0]
    assert first.weight.shape == (8, 64) and first.bias is None
    assert second.weight.shape == (32, 8) and second.bias is not None
    full = compress(model, Plan({"0": LayerPlan(rank=0.9999)})).module  # rank 32 = exact
    x = torch.randn(5, 64)
    torch.testing.assert_close(full(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_conv_factorization_becomes_kxk_then_1x1(conv):
    torch.manual_seed(0)
    layer = conv(16, 32, 3, padding=1, stride=2)
    model = nn.Sequential(layer)
    low = compress(model, Plan({"0": LayerPlan(rank=0.5)})).module
    first, second = low[0]
    assert first.out_channels == 16 and first.kernel_size == layer.kernel_size
    assert first.stride == layer.stride and first.padding == layer.padding
    assert second.in_channels == 16 and second.out_channels == 32
    assert set(second.kernel_size) == {1}
    full = compress(model, Plan({"0": LayerPlan(rank=0.9999)})).module
    x = torch.randn(2, 16, *([9] * (layer.weight.dim() - 2)))
    torch.testing.assert_close(full(x), model(x), atol=1e-4, rtol=1e-4)


def test_only_ranks_that_save_parameters_are_offered():
    layer = nn.Linear(128, 1024)  # full rank 128; a rank r costs r * 1152 vs 131072
    assert rank_for(layer, 0.75) == 96 and helps(layer, 0.75)
    square = nn.Linear(10, 10)  # rank r costs 20 r vs 100: only r < 5 helps
    offered = TECHNIQUES["rank"].offer(_site(square), [0.25, 0.5, 0.75, 1.0])
    assert isinstance(offered, CategoricalDistribution)
    assert offered.choices == (0.25, 1.0)
    assert TECHNIQUES["rank"].offer(_site(nn.Linear(2, 2)), [0.5, 1.0]) is None
    depthwise = nn.Conv2d(4, 4, 3, groups=4)  # a 1 x 9 matrix per channel: rank 1 already
    assert TECHNIQUES["rank"].offer(_site(depthwise), [0.5, 1.0]) is None


def test_a_grouped_conv_is_factorized_group_by_group():
    """Groups of 4 inputs x 8 outputs, 3x3: a rank r per group is a grouped conv with r
    outputs per group, then a grouped 1x1; at full rank it computes the original."""
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 32, 3, padding=1, groups=4)
    model = nn.Sequential(layer)
    assert TECHNIQUES["rank"].offer(_site(layer), [0.5, 1.0]) is not None
    first, second = compress(model, Plan({"0": LayerPlan(rank=0.5)})).module[0]
    assert (first.groups, first.in_channels, first.out_channels) == (4, 16, 16)  # 4 per group
    assert (second.groups, second.in_channels, second.out_channels) == (4, 16, 32)
    assert second.kernel_size == (1, 1)
    full = compress(model, Plan({"0": LayerPlan(rank=0.9999)})).module
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(full(x), model(x), atol=1e-4, rtol=1e-4)


def test_a_hugging_face_conv1d_is_factorized_as_the_linear_it_is(tmp_path):
    """GPT-2's projections: Conv1D(nf=out, nx=in) stores its weight (in, out)."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    from autosqueeze.artifacts.artifact import load_artifact, save_artifact
    from autosqueeze.compression.codecs import TensorCodec, encode
    from autosqueeze.compression.size_model import layer_bytes, stored_weights

    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(128, 32)  # 32 -> 128
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    model = nn.Sequential(layer).eval()
    assert TECHNIQUES["rank"].offer(_site(layer), [0.5, 1.0]) is not None
    plan = Plan({"0": LayerPlan(rank=0.5, bits=8)})
    first, second = compress(model, plan).module[0]
    assert first.weight.shape == (16, 32) and second.weight.shape == (128, 16)
    x = torch.randn(3, 5, 32)
    full = compress(model, Plan({"0": LayerPlan(rank=0.9999)})).module
    torch.testing.assert_close(full(x), model(x), atol=1e-4, rtol=1e-4)
    path, fp32 = tmp_path / "m.safetensors", Plan({"0": LayerPlan(rank=0.5)})
    save_artifact(compress(model, fp32), path)  # stored losslessly: loads what compress made
    fresh = nn.Sequential(pytorch_utils.Conv1D(128, 32)).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_artifact(path, fresh)(x), compress(model, fp32).module(x))
    predicted = layer_bytes(layer, stored_weights(layer, 8, None), rank=0.5)
    stored = sum(encode(w, TensorCodec(8)).nbytes for w in (first.weight, second.weight))
    assert abs(predicted - stored) <= 0.05 * stored  # the factors' bytes, priced as a Linear's


def _site(layer: nn.Module) -> Site:
    return Site("layer", layer, nn.Sequential(layer), Target())


def test_magnitude_pruning_zeroes_exactly_the_smallest():
    weight = torch.arange(1.0, 101.0).reshape(10, 10) * torch.tensor([1.0, -1.0]).repeat(5)
    prune_by_magnitude(weight, 0.3)
    assert int((weight == 0).sum()) == 30
    assert weight.abs()[weight != 0].min() == 31


def test_magnitude_pruning_breaks_ties_by_position_as_a_stable_sort_would():
    generator = torch.Generator().manual_seed(0)
    for ratio in (0.1, 0.35, 0.5, 0.9):
        weight = torch.randint(-4, 5, (257,), generator=generator).float()  # many ties
        expected = weight.clone()
        count = round(ratio * weight.numel())
        expected[torch.argsort(expected.abs(), stable=True)[:count]] = 0
        prune_by_magnitude(weight, ratio)
        assert torch.equal(weight, expected)


def test_factorizing_again_reuses_the_decomposition_and_gives_the_same_weights():
    from autosqueeze.compression.techniques import factorize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    plan = Plan({"0": LayerPlan(rank=0.25)})
    factorize._SVDS.clear()
    first = compress(model, plan).module.state_dict()
    assert len(factorize._SVDS) == 1
    again = compress(model, plan).module.state_dict()
    assert len(factorize._SVDS) == 1  # a hit
    for key in first:
        torch.testing.assert_close(first[key], again[key], atol=0, rtol=0)


def test_compress_prunes_both_factors_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    before = copy.deepcopy(model.state_dict())
    compressed = compress(model, Plan({"0": LayerPlan(rank=0.25, prune=0.5, bits=4)}))
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value)
    first, second = compressed.module[0]
    assert (first.weight == 0).float().mean() == 0.5 and (second.weight == 0).float().mean() == 0.5
    assert {k: c.bits for k, c in compressed.codecs.items()} == {"0.0.weight": 4, "0.1.weight": 4}


def test_rebuild_gives_the_structure_compress_gives():
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    plan = Plan({"0": LayerPlan(rank=0.5), "2": LayerPlan(rank=0.25)})
    compressed = compress(model, plan).module
    rebuilt = rebuild(copy.deepcopy(model), plan)
    shapes = {k: v.shape for k, v in compressed.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_a_plan_naming_a_missing_layer_is_an_error():
    with pytest.raises(ValueError, match="does not have"):
        compress(nn.Sequential(nn.Linear(2, 2)), Plan({"nope": LayerPlan(bits=8)}))


def test_cluster_stores_a_layer_as_shared_values_and_replaces_its_bits(tmp_path):
    """Deep Compression's order: pruned, then shared (the pruned zeros keep a value of
    their own), then coded; the loaded layer holds at most 2**cluster distinct values, and
    the layer's ``bits`` no longer say how it is stored."""
    from autosqueeze.artifacts.artifact import load_artifact, save_artifact
    from autosqueeze.examples.digits import pretrained_cnn

    plan = Plan({"classifier.1": LayerPlan(bits=8, prune=0.6, cluster=3)})
    compressed = compress(pretrained_cnn(), plan)
    assert compressed.codecs["classifier.1.weight"].codebook
    save_artifact(compressed, tmp_path / "m.safetensors")
    loaded = load_artifact(tmp_path / "m.safetensors", pretrained_cnn())
    weight = loaded.classifier[1].weight
    assert weight.unique().numel() <= 8 and 0 in weight.unique()
    assert int((weight == 0).sum()) >= round(0.6 * weight.numel())
    assert TECHNIQUES["cluster"].offer(_site(nn.Linear(8, 8)), [0, 2, 4]) is not None
    with pytest.raises(ValueError, match="cluster is 0"):
        TECHNIQUES["cluster"].validate([0, 9])


def test_a_rules_cluster_rows_gives_each_group_of_rows_a_codebook_in_the_file(tmp_path):
    """``cluster_rows`` in a space rule: the plan carries it, the artifact stores one
    codebook per group of rows, and the loaded layer's groups each hold at most 2**cluster
    values (more than that across the layer)."""
    import yaml

    from autosqueeze.artifacts.artifact import load_artifact, read_plan, save_artifact
    from autosqueeze.examples.digits import pretrained_cnn
    from autosqueeze.searchspace.space import build_space

    rule = {"types": ["Linear"], "names": ["classifier.1"], "knobs": {"cluster": [0, 2]}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"rules": [{**rule, "cluster_rows": 16}]}))
    space = build_space(pretrained_cnn(), path)
    plan = space.plan({"classifier.1.cluster": 2})
    assert plan.layers["classifier.1"] == LayerPlan(cluster=2, cluster_rows=16)
    save_artifact(compress(pretrained_cnn(), plan), tmp_path / "m.safetensors")
    assert read_plan(tmp_path / "m.safetensors") == plan
    weight = load_artifact(tmp_path / "m.safetensors", pretrained_cnn()).classifier[1].weight
    assert all(group.unique().numel() <= 4 for group in weight.split(16))
    assert weight.unique().numel() > 4
    path.write_text(yaml.safe_dump({"rules": [{**rule, "cluster_rows": 0}]}))
    with pytest.raises(UserError, match="cluster_rows"):
        build_space(pretrained_cnn(), path)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
def test_a_separable_conv_is_depthwise_then_pointwise_and_exact_at_full_rank(conv):
    """Each input channel's filters (outputs x taps) fitted at rank m: exact once m reaches
    the taps, and at m = 1 what a rank-1 fit of each channel's filters gives."""
    torch.manual_seed(0)
    layer = conv(6, 32, 3, padding=1, stride=2, dilation=1)
    model = nn.Sequential(layer)
    taps = layer.weight[0, 0].numel()
    x = torch.randn(2, 6, *([7] * (layer.weight.dim() - 2)))
    exact = compress(model, Plan({"0": LayerPlan(separable=taps)})).module
    depthwise, pointwise = exact[0]
    assert depthwise.groups == 6 and depthwise.out_channels == 6 * taps
    assert depthwise.stride == layer.stride and depthwise.padding == layer.padding
    assert pointwise.in_channels == 6 * taps and pointwise.out_channels == 32
    assert set(pointwise.kernel_size) == {1} and pointwise.bias is not None
    torch.testing.assert_close(exact(x), model(x), atol=1e-4, rtol=1e-4)

    one = compress(model, Plan({"0": LayerPlan(separable=1)})).module
    fitted = torch.empty_like(layer.weight)  # the best rank-1 fit, channel by channel
    for c in range(6):
        u, s, vh = torch.linalg.svd(layer.weight[:, c].reshape(32, -1).double())
        fitted[:, c] = (s[0] * u[:, :1] @ vh[:1]).reshape(fitted[:, c].shape).float()
    expected = conv(6, 32, 3, padding=1, stride=2)
    with torch.no_grad():
        expected.weight.copy_(fitted)
        expected.bias.copy_(layer.bias)
    torch.testing.assert_close(one(x), expected(x), atol=1e-4, rtol=1e-4)


def test_separable_is_offered_only_where_it_saves_parameters():
    offer = TECHNIQUES["separable"].offer
    # 32 -> 64 3x3: m (9 + 64) per input against 576: m <= 7 saves, and m <= 9 (the taps)
    offered = offer(_site(nn.Conv2d(32, 64, 3)), [0, 1, 2, 8])
    assert isinstance(offered, CategoricalDistribution) and offered.choices == (0, 1, 2)
    assert offer(_site(nn.Conv2d(2, 32, 3)), [0, 1]).choices == (0, 1)  # 2 (9 + 32) < 576
    assert offer(_site(nn.Conv2d(1, 32, 3)), [0, 1]) is None  # one input: that is rank
    assert offer(_site(nn.Conv2d(8, 1, 3)), [0, 1]) is None  # 9 + 1 per input: not < 9
    assert offer(_site(nn.Conv2d(8, 8, 1)), [0, 1]) is None  # no spatial filter
    assert offer(_site(nn.Conv2d(8, 8, 3, groups=8)), [0, 1]) is None  # separated already
    assert offer(_site(nn.ConvTranspose2d(8, 8, 3)), [0, 1]) is None
    assert offer(_site(nn.Linear(8, 8)), [0, 1]) is None
    with pytest.raises(ValueError, match="depth multiplier"):
        TECHNIQUES["separable"].validate([0, 1.5])


def test_a_factorized_layer_is_separated_in_its_kxk_half_and_loads_back(tmp_path):
    from autosqueeze.artifacts.artifact import load_artifact, save_artifact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3))
    plan = Plan(
        {
            "0": LayerPlan(rank=0.5, separable=2, bits=6, prune=0.3),
            "2": LayerPlan(separable=1, kernel="bf16"),
        }
    )
    compressed = compress(model, plan)
    (kxk, across), rest = compressed.module[0]
    assert kxk.groups == 16 and kxk.out_channels == 32 and across.out_channels == 16  # rank 16
    assert rest.in_channels == 16 and rest.out_channels == 32
    path = tmp_path / "m.safetensors"
    save_artifact(compressed, path)
    fresh = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3))
    loaded = load_artifact(path, fresh)
    x = torch.randn(2, 16, 9, 9)
    with applied(model, plan) as probed:  # a probe is the model the artifact loads
        torch.testing.assert_close(probed(x), loaded(x), atol=0, rtol=0)
    shapes = {k: v.shape for k, v in compressed.module.state_dict().items()}
    rebuilt = rebuild(
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3)), plan
    )
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_a_kernel_runs_the_parts_of_a_separated_conv_it_can_and_leaves_the_rest():
    """int8_dynamic runs plain convs only: the pointwise half takes it, the depthwise half
    (a grouped conv) runs as it is (found by a residual-CNN search: it raised in int_mm)."""
    from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact
    from autosqueeze.compression.kernels import Int8DynamicConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    plan = Plan({"0": LayerPlan(separable=1, kernel="int8_dynamic")})
    loaded = load_artifact(artifact_bytes(compress(model, plan)), copy.deepcopy(model))
    depthwise, pointwise = loaded[0]
    assert type(depthwise) is nn.Conv2d and isinstance(pointwise, Int8DynamicConv2d)
    x = torch.randn(2, 16, 8, 8)
    with applied(model, Plan({"0": LayerPlan(separable=1)})) as fp32:
        torch.testing.assert_close(loaded(x), fp32(x), atol=0.05, rtol=0.05)
