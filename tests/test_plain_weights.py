"""Parametrized weights (weight norm, spectral norm, torch's parametrize) are folded into
plain parameters when the model is loaded: the function is unchanged and the layer's weight
is one tensor the techniques can store, prune and quantize."""

from __future__ import annotations

import pytest
import torch
from conftest import write_yaml
from torch import nn
from torch.nn.utils import parametrizations, parametrize, spectral_norm, weight_norm

from autosqueeze.cli import main
from autosqueeze.problem.plain_weights import fold_parametrizations


class Speech(nn.Module):
    """A speech encoder's positional convolution (weight norm over the kernel's last axis,
    as wav2vec 2.0 has it), an old hook-based weight norm, and a spectral norm."""

    def __init__(self) -> None:
        super().__init__()
        self.position = parametrizations.weight_norm(nn.Conv1d(8, 8, 5, padding=2), dim=2)
        self.old = weight_norm(nn.Conv1d(8, 8, 3, padding=1))
        self.spectral = spectral_norm(nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spectral((self.old(self.position(x)) + x).mean(-1))


def build() -> nn.Module:
    torch.manual_seed(0)
    return Speech().eval()


def data() -> list[tuple[torch.Tensor, None]]:
    torch.manual_seed(1)
    return [(torch.randn(4, 8, 16), None) for _ in range(2)]


pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*:FutureWarning")


def test_folding_keeps_the_function_and_leaves_plain_weights():
    model = build()
    x = data()[0][0]
    with torch.inference_mode():
        want = model(x)
    folded = fold_parametrizations(model)
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert not any(m._forward_pre_hooks for m in folded.modules())
    for layer in (folded.position, folded.old, folded.spectral):
        assert isinstance(layer._parameters["weight"], nn.Parameter)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), want)


def test_a_weight_norm_convolution_gets_knobs_on_its_whole_kernel(tmp_path, capsys):
    rules = {"rules": [{"types": ["Conv1d", "Linear"], "knobs": {"bits": [4, 8]}}]}
    space = write_yaml(tmp_path / "space.yaml", rules)
    config = write_yaml(
        tmp_path / "study.yaml",
        {
            "name": "speech",
            "model": {"factory": "test_plain_weights:build"},
            "task": {"data": "test_plain_weights:data", "metric": "fidelity"},
            "space": str(space),
            "budgets": {"max_metric_drop": 0.05, "runtime": "torch"},
            "search": {"trials": 2, "output_dir": str(tmp_path / "run")},
        },
    )
    assert main(["validate", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "knobs reach 564 of 564 parameters (100%)" in shown, shown  # 328 + 200 + 36
