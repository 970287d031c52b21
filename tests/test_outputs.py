"""Model outputs of any shape: a Hugging Face ``ModelOutput``, tuples holding ``None``,
dicts with caches. ``task.output`` names the part the built-in metrics and the sensitivity
pass compare; a name the output does not have is an error that lists what it has."""

from __future__ import annotations

import pytest
import torch
from conftest import DEFAULT_SPACE, write_yaml

from autosqueeze.cli import main
from autosqueeze.usercode.metrics import primary_output

MODULE = '''
import torch
from torch import nn

class Encoder(nn.Module):
    """Returns what language models return: a dict with None, a cache, two tensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        hidden = torch.relu(self.embed(x))
        return {"loss": None, "past": [(hidden, hidden)], "hidden": hidden,
                "scores": self.head(hidden)}

def build():
    return Encoder().eval()

def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.zeros(8)) for _ in range(4)]
'''


def test_the_part_named_by_task_output_is_the_one_compared():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    torch.manual_seed(0)
    out = transformers.BertModel(config).eval()(torch.tensor([[1, 2, 3]]))
    assert primary_output(out) is out.last_hidden_state
    assert primary_output(out, "pooler_output") is out.pooler_output
    pair = (None, torch.ones(2))
    assert primary_output(pair) is pair[1] and primary_output(pair, "1") is pair[1]
    with pytest.raises(TypeError, match="its tensors: last_hidden_state, pooler_output"):
        primary_output(out, "logits")


@pytest.mark.parametrize(("output", "ok"), [("hidden", True), ("scores", True), ("past", False)])
def test_validate_compares_the_named_output(tmp_path, capsys, output, ok):
    (tmp_path / "encoder.py").write_text(MODULE)
    config = write_yaml(
        tmp_path / "study.yaml",
        {
            "name": "outputs",
            "model": {"factory": "encoder:build"},
            "task": {"data": "encoder:data", "metric": "fidelity", "output": output},
            "space": str(DEFAULT_SPACE),
            "compute": {"workers": 0},
        },
    )
    code = main(["validate", str(config)])
    out, err = capsys.readouterr()
    if ok:
        assert code == 0, err
        assert "metric    fidelity of the original model: 1.000000" in out
    else:
        assert code == 2
        assert "task.output 'past'" in err and "its tensors: hidden, scores" in err
