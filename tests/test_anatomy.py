"""Layers that may only change in place: tied weights (one unit, stored once, tied again at
load), layers whose attributes the model reads, subclasses with a forward of their own; and
a third-party analysis that fails on a model withholds its knob instead of ending the command."""

from __future__ import annotations

import torch
import yaml
from conftest import DEFAULT_SPACE, study_config, write_yaml
from torch import nn

from autosqueeze.artifacts.artifact import (
    artifact_bytes,
    artifact_size,
    load_artifact,
    stored_bytes,
)
from autosqueeze.cli import main
from autosqueeze.compression.techniques import Target, applied, compress
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searchspace.anatomy import anatomy
from autosqueeze.searchspace.space import build_space, coverage

SPACE = {
    "rules": [
        {
            "types": ["Embedding"],
            "knobs": {"bits": [4, 8, 32], "kernel": ["fp32", "int8_weight_only"]},
        },
        {
            "types": ["Linear", "MultiheadAttention"],
            "knobs": {"bits": [4, 8, 32], "rank": [0.25, 1.0], "kernel": ["fp32", "bf16"]},
        },
    ]
}


class TiedLM(nn.Module):
    """A language model whose output head is its embedding, as GPT-2's and BERT-MLM's are."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class Shifted(nn.Embedding):
    """An embedding subclass that computes its own input (as BART's positions do)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.arange(ids.shape[1]).expand_as(ids))


class Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.positions = Shifted(16, 32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.positions(ids)
        return self.out(self.attention(h, h, h, need_weights=False)[0].mean(dim=1))


def _space(tmp_path, model, example=None):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return build_space(model, path, Target("cpu", example))


def test_a_tied_weight_is_one_unit_stored_once_and_tied_again_at_load(tmp_path):
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 64, (4, 8))
    before = model(ids)
    space = _space(tmp_path, model, ids)
    assert "head" not in space.layers  # searched at its first holder
    assert set(space.layers["embed"].searched) == {"bits"}  # kernel would replace the layer
    assert "tied to head" in space.withheld["embed"]
    assert set(space.layers["mix"].searched) == {"bits", "rank", "kernel"}

    plan = Plan({"embed": LayerPlan(bits=4, group_size=32), "mix": LayerPlan(bits=8)})
    compressed = compress(model, plan)
    data = artifact_bytes(compressed)
    assert len(stored_bytes(data)) == artifact_size(compressed)
    untied = artifact_size(compress(TiedLM().eval(), Plan({"mix": LayerPlan(bits=8)})))
    assert len(data) < untied - 64 * 32 * 4 * 0.8  # the fp32 copy of the head is not stored
    loaded = load_artifact(data, TiedLM())
    assert loaded.head.weight is loaded.embed.weight
    with applied(model, plan) as probed:  # a sensitivity probe: the same model as the artifact
        assert torch.equal(probed(ids), loaded(ids))
    assert model.head.weight is model.embed.weight  # the probe put it back, still tied
    assert torch.equal(model(ids), before)


def test_layers_the_model_reads_or_that_compute_their_own_input_stay_in_place(tmp_path):
    torch.manual_seed(0)
    model = Attending().eval()
    ids = torch.randint(0, 64, (2, 16))
    facts = anatomy(model, ["embed", "positions", "attention.out_proj", "out"], ids)
    assert facts.read_outside == {"attention.out_proj": frozenset({"weight", "bias"})}
    assert facts.own_forward == {"positions": "Shifted"}
    space = _space(tmp_path, model, ids)
    assert set(space.layers["attention.out_proj"].searched) == {"bits"}
    assert set(space.layers["positions"].searched) == {"bits"}
    assert set(space.layers["out"].searched) == {"bits", "rank", "kernel"}
    assert set(space.layers["attention"].searched) == {"bits"}  # its in_proj_weight
    # every plan the space gives runs, and the artifact is what was measured
    plan = space.most_compressed_plan()
    compressed = compress(model, plan)
    assert "attention.in_proj_weight" in compressed.codecs
    loaded = load_artifact(artifact_bytes(compressed), Attending())
    with applied(model, plan) as probed:
        assert torch.equal(probed(ids), loaded(ids))
    rows = {r.name: r for r in coverage(model, space)}
    assert rows["attention"].parameters == 3 * 32 * 32 + 3 * 32
    assert "the model reads its bias, weight" in rows["attention.out_proj"].why


GRAD_SHY = '''
import torch
from torch import nn


class GradShy(nn.Module):
    """Runs as a model should, but raises when traced with gradients on (as Torch-Pruning
    traces): a third-party analysis failing on a model it does not understand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        if torch.is_grad_enabled():
            raise ZeroDivisionError("integer division or modulo by zero")
        return self.head(self.conv(x.reshape(-1, 1, 8, 8)).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return GradShy().eval()


def constant():
    model = build()
    with torch.no_grad():
        model.head.weight.zero_()
    return model
'''


def test_a_failing_analysis_withholds_its_knob_and_validate_says_why(tmp_path, capsys):
    (tmp_path / "grad_shy.py").write_text(GRAD_SHY)
    config = study_config(tmp_path, model={"factory": "grad_shy:build"}, space=str(DEFAULT_SPACE))
    path = write_yaml(tmp_path / "study.yaml", config)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    conv = next(line for line in out.splitlines() if line.startswith("conv "))
    assert "bits" in conv and "prune_channels: " in conv and "Torch-Pruning cannot analyse" in conv
    assert "parameters (100%)" in out
    assert main(["search", str(path), "--no-progress"]) == 0  # and the study goes on

    config["model"] = {"factory": "grad_shy:constant"}
    config["name"] = "constant"
    path = write_yaml(tmp_path / "constant.yaml", config)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: the original model gives the same output for every sample" in out


def test_an_analysis_that_runs_on_is_stopped():
    import pytest

    from autosqueeze.common.time_limit import time_limit

    with pytest.raises(TimeoutError, match="took over 0.2 s"), time_limit(0.2):
        while True:  # as Torch-Pruning's grouping ran on a tiny LLaMA
            pass
    with time_limit(5):
        pass  # a block that ends in time leaves no timer behind
