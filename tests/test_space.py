from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEFAULT_SPACE
from optuna.distributions import CategoricalDistribution, FloatDistribution

from autosqueeze.common.errors import UserError
from autosqueeze.examples.digits import pretrained_cnn
from autosqueeze.plans.plan import LayerPlan
from autosqueeze.searchspace.space import build_space, load_space_file

LAYERS = ["features.0", "features.2", "features.5", "classifier.1", "classifier.3"]


def space_file(tmp_path: Path, rules: list) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"rules": rules}))
    return path


def test_default_space_gives_every_conv_and_linear_its_knobs():
    space = build_space(pretrained_cnn(), DEFAULT_SPACE)  # no example input: no prune_channels
    assert list(space.layers) == LAYERS
    dists = space.distributions
    assert len(dists) == 20 + 5  # bits, prune, rank, cluster; a kernel per layer
    assert dists["features.2.kernel"].choices == ("fp32", "bf16", "int8_dynamic")  # a conv's
    assert "int8_dynamic" in dists["classifier.1.kernel"].choices
    assert isinstance(dists["features.2.bits"], CategoricalDistribution)
    assert isinstance(dists["classifier.1.prune"], FloatDistribution)
    assert dists["classifier.1.prune"].step == 0.05
    # classifier.3 is 10 x 128: only ranks below 10 * 128 / 138 = 9.3 save parameters
    assert dists["classifier.3.rank"].choices == (0.125, 0.25, 0.5, 0.75, 1.0)


def test_validate_says_why_a_depthwise_or_grouped_conv_gets_fewer_knobs():
    """A MobileNet-style block: the depthwise conv is rank 1 per channel and its channels go
    with the layer feeding it; a grouped conv is factorized per group, keeps its channels,
    and runs neither int8 kernel (not one GEMM)."""
    import torch
    from torch import nn

    from autosqueeze.compression.techniques import Target
    from autosqueeze.searchspace.space import coverage

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # depthwise
        nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(),  # grouped
        nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    ).eval()  # fmt: skip
    space = build_space(model, DEFAULT_SPACE, Target("cpu", torch.randn(2, 3, 8, 8)))
    rows = {r.name: r for r in coverage(model, space)}
    assert "rank" not in rows["2"].knobs and "prune_channels" not in rows["2"].knobs
    assert "rank: a depthwise filter is rank 1 already" in rows["2"].why
    assert "prune_channels: a depthwise convolution's channels go with the layer" in rows["2"].why
    assert "rank" in rows["4"].knobs and "grouped convolution keeps its channels" in rows["4"].why
    assert space.distributions["4.kernel"].choices == ("fp32", "bf16")
    assert "int8_dynamic" in space.distributions["0.kernel"].choices
    assert "prune_channels" in rows["6"].knobs
    assert "prune_channels: its outputs cannot go alone" in rows["8"].why  # the logits


def test_params_become_a_plan_and_back():
    space = build_space(pretrained_cnn(), DEFAULT_SPACE)
    params = {
        name: dist.choices[0] if hasattr(dist, "choices") else dist.low
        for name, dist in space.distributions.items()
    }
    plan = space.plan(params)
    assert plan.layers["features.0"] == LayerPlan(bits=2, prune=0.0, rank=0.125)
    assert space.params_for(plan) == params
    assert space.params_for(space.uniform_plan(bits=7)) is None  # 7 bits is not offered


def test_a_plan_needing_a_knob_the_space_lacks_is_not_expressible(tmp_path):
    path = space_file(tmp_path, [{"types": ["Linear"], "knobs": {"prune": [0.0, 0.5]}}])
    space = build_space(pretrained_cnn(), path)
    expected = {"classifier.1.prune": 0, "classifier.3.prune": 0}
    assert space.params_for(space.uniform_plan()) == expected
    assert space.params_for(space.uniform_plan(bits=8)) is None


def test_rules_match_in_order_with_fixed_values_and_exclusions(tmp_path):
    path = space_file(
        tmp_path,
        [
            {"types": ["Linear"], "names": ["classifier.3"], "knobs": {"bits": 8}},
            {
                "types": ["Linear", "Conv2d"],
                "exclude": ["features.0"],
                "knobs": {"bits": [4, 8], "prune": {"low": 0, "high": 0.5, "step": 0.25}},
                "group_size": 32,
            },
        ],
    )
    space = build_space(pretrained_cnn(), path)
    assert list(space.layers) == LAYERS[1:]
    assert space.layers["classifier.3"].fixed == {"bits": 8}
    assert space.layers["classifier.3"].searched == {}
    plan = space.plan({"features.2.bits": 4, "features.2.prune": 0.25})
    assert plan.layers["features.2"] == LayerPlan(bits=4, prune=0.25, group_size=32)
    assert plan.layers["classifier.3"] == LayerPlan(bits=8)
    assert space.most_compressed_plan().layers["features.5"] == LayerPlan(
        bits=4, prune=0.5, group_size=32
    )


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"types": ["nn.Linear"]}], "'nn.Linear' is not a class name"),
        ([{"knobs": {"bitz": [4]}}], "unknown knob 'bitz'"),
        ([{"knobs": {"bits": [1, 4]}}], "bits must be among"),
        ([{"knobs": {"prune": {"low": 0, "high": 1.5}}}], "prune is a fraction"),
        ([{"knobs": {"rank": {"low": 0.1, "high": 1}}}], "rank takes a list"),
        ([{"knobs": {"prune": ["abc", 0.5]}}], "prune takes numbers, not 'abc'"),
        ([{"knobs": {"bits": "four"}}], "bits takes numbers, not 'four'"),
        ([{"colour": "red"}], "Extra inputs are not permitted"),
    ],
)
def test_bad_space_files_name_the_problem(tmp_path, rules, message):
    with pytest.raises(UserError, match=message):
        load_space_file(space_file(tmp_path, rules))


def test_a_type_neither_torchs_nor_the_models_is_a_typo(tmp_path):
    path = space_file(tmp_path, [{"types": ["Linaer"], "knobs": {"bits": [4, 8]}}])
    with pytest.raises(UserError, match=r"rules\[0\].types: 'Linaer' is neither a torch.nn"):
        build_space(pretrained_cnn(), path)


def test_a_space_that_matches_nothing_says_what_the_model_has(tmp_path):
    path = space_file(tmp_path, [{"types": ["Embedding"], "knobs": {"bits": [4, 8]}}])
    with pytest.raises(UserError, match="no layer of the model matches.*Conv2d"):
        build_space(pretrained_cnn(), path)


def test_nearest_params_project_a_uniform_plan_onto_the_space(tmp_path):
    path = space_file(
        tmp_path,
        [
            {
                "types": ["Conv2d"],
                "knobs": {"bits": [8, 16, 32], "prune": {"low": 0.1, "high": 0.5, "step": 0.2}},
            },
            {"types": ["Linear"], "knobs": {"bits": [3, 5, 32], "rank": [0.5, 1.0]}},
        ],
    )
    space = build_space(pretrained_cnn(), path)
    params = space.nearest_params(bits=6)
    assert params["features.0.bits"] == 8 and params["classifier.1.bits"] == 5
    assert params["features.0.prune"] == 0.1  # nearest offered to "no pruning"
    assert params["classifier.1.rank"] == 1.0
    assert set(params) == set(space.distributions)


class _Upsampler(torch.nn.Module):
    """A transposed convolution and a bare position parameter, as decoders and ViTs hold."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(4, 8, 2, stride=2)
        self.pos = torch.nn.Parameter(torch.randn(1, 8, 6, 6))
        self.head = torch.nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        return self.head((self.up(x) + self.pos).flatten(1))


def test_transposed_convolutions_get_knobs_and_bare_parameters_a_reason():
    from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact
    from autosqueeze.compression.techniques import Target, compress
    from autosqueeze.searchspace.space import coverage

    torch.manual_seed(0)
    model, x = _Upsampler().eval(), torch.randn(2, 4, 3, 3)
    space = build_space(model, DEFAULT_SPACE, Target("cpu", x))
    assert set(space.layers["up"].searched) == {"bits", "prune", "cluster"}
    rows = {r.name: r for r in coverage(model, space)}
    for why in (
        "rank: a transposed convolution is not factorized",
        "prune_channels: a transposed convolution keeps its channels",
        "kernel: no kernel runs a ConvTranspose2d on cpu",
    ):
        assert why in rows["up"].why
    assert "(pos)" in rows["(model)"].why and "fp32" in rows["(model)"].why
    plan = space.most_compressed_plan()
    loaded = load_artifact(artifact_bytes(compress(model, plan, Target("cpu", x))), _Upsampler())
    assert loaded(x).shape == (2, 3)
