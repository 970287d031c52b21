import json
import os
import struct

import pytest
import torch
from safetensors.torch import load as load_tensors

from autosqueeze.artifacts.artifact import (
    _DEFLATED,
    artifact_bytes,
    bit_packed_bytes,
    load_artifact,
    read_plan,
    save_artifact,
    shipped,
    stored_bytes,
)
from autosqueeze.compression.codecs import decode, encode
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples.digits import DigitsCNN, example_input, pretrained_cnn
from autosqueeze.plans.plan import LayerPlan, Plan

PLAN = Plan(
    {
        "features.0": LayerPlan(bits=8),
        "features.2": LayerPlan(bits=4, prune=0.5, group_size=32),
        "features.5": LayerPlan(bits=3, rank=0.5),
        "classifier.1": LayerPlan(bits=5, prune=0.3, rank=0.25),
        "classifier.3": LayerPlan(bits=16),
    }
)


def test_size_is_the_file_and_the_file_is_only_packed_tensors(tmp_path):
    compressed = compress(pretrained_cnn(), PLAN)
    path = tmp_path / "model.safetensors"
    size = save_artifact(compressed, path)
    assert size == path.stat().st_size
    stored = stored_bytes(path)  # the safetensors file, deflated in the shipped one
    assert size < len(stored)
    header_len = struct.unpack("<Q", stored[:8])[0]
    header = json.loads(stored[8 : 8 + header_len])
    data_bytes = sum(
        v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    )
    assert len(stored) == 8 + header_len + data_bytes
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes["classifier.1.0.weight::q"] == "U8"  # 5-bit values packed into bytes
    # fp16 (many of this layer's weights underflow to 0 in fp16, so it is stored sparse)
    assert dtypes["classifier.3.weight::values"] == "F16"
    fp32 = save_artifact(compress(pretrained_cnn(), Plan()), tmp_path / "fp32.safetensors")
    assert size * 5 < fp32


def test_the_file_is_deflated_when_that_is_smaller_and_the_same_every_build():
    compressed = compress(pretrained_cnn(), PLAN)
    data = artifact_bytes(compressed)
    assert data.startswith(_DEFLATED) and len(data) < len(stored_bytes(data))
    assert all(artifact_bytes(compressed) == data for _ in range(4))  # byte for byte
    noise = os.urandom(4096)  # nothing for deflate: shipped as it is
    assert shipped(noise) == noise and stored_bytes(noise) == noise


def test_loaded_artifact_is_the_compressed_model(tmp_path):
    compressed = compress(pretrained_cnn(), PLAN)
    path = tmp_path / "model.safetensors"
    save_artifact(compressed, path)
    loaded = load_artifact(path, DigitsCNN())
    assert read_plan(path) == PLAN
    assert isinstance(loaded.classifier[1], torch.nn.Sequential)
    # the loaded weights are the in-memory ones passed through their codecs, exactly
    expected = compressed.module.state_dict()
    for key, codec in compressed.codecs.items():
        encoded = encode(expected[key], codec)
        expected[key] = decode(encoded.parts, encoded.meta)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    x = example_input()
    torch.testing.assert_close(load_artifact(path, DigitsCNN())(x), loaded(x), atol=0, rtol=0)
    assert (loaded.features[2].weight == 0).float().mean() >= 0.5


def test_lossless_plan_round_trips_bit_exactly(tmp_path):
    original = pretrained_cnn()
    plan = Plan({"classifier.1": LayerPlan(prune=0.5)})  # fp32, stored as bitmap + values
    path = tmp_path / "pruned.safetensors"
    save_artifact(compress(original, plan), path)
    assert "classifier.1.weight::mask" in load_tensors(stored_bytes(path))
    loaded = load_artifact(path, DigitsCNN())
    expected = compress(original, plan).module
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_artifact_that_does_not_fit_the_model_is_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_artifact(compress(pretrained_cnn(), PLAN), path)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_artifact(path, torch.nn.Sequential(torch.nn.Linear(3, 3)))
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an autosqueeze artifact"):
        load_artifact(other, DigitsCNN())


def test_reused_encodings_give_the_bytes_a_fresh_encoding_gives_and_follow_the_weights():
    from autosqueeze.artifacts import artifact

    model = pretrained_cnn()
    artifact._ENCODINGS.clear()
    artifact._DECODED.clear()
    first = artifact_bytes(compress(model, PLAN))
    cached = len(artifact._ENCODINGS)
    assert cached > 0
    assert_same_artifact(artifact_bytes(compress(model, PLAN)), first)  # from the cache
    assert len(artifact._ENCODINGS) == cached
    artifact._ENCODINGS.clear()
    assert_same_artifact(artifact_bytes(compress(model, PLAN)), first)  # computed afresh
    loaded = [load_artifact(first, DigitsCNN(), None).state_dict() for _ in range(2)]
    for key in loaded[0]:
        assert torch.equal(loaded[0][key], loaded[1][key])
    with torch.no_grad():  # same shapes, other values: nothing stale comes back
        model.features[0].weight.mul_(0.5)
    changed = artifact_bytes(compress(model, PLAN))
    with pytest.raises(AssertionError):
        assert_same_artifact(changed, first)
    artifact._ENCODINGS.clear()
    assert_same_artifact(artifact_bytes(compress(model, PLAN)), changed)


def assert_same_artifact(a: bytes, b: bytes) -> None:
    """The same file, byte for byte (metadata keys are written in sorted order)."""
    assert a == b


ELSEWHERE = """
import sys
import torch
from torch import nn
from autosqueeze import Target, load_artifact

sys.modules["autosqueeze.examples"] = None  # the search's factory is not on this machine


class MyCNN(nn.Module):  # the user's own copy of the class the search compressed
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


x = torch.load(sys.argv[2])
for example in (None, x):
    try:
        model = load_artifact(sys.argv[1], MyCNN(), Target("cpu", example))
    except ValueError as exc:
        print("refused:", exc)
        continue
    torch.save(model(x), sys.argv[3])
"""


def test_an_artifact_loads_elsewhere_by_the_users_own_class(tmp_path):
    """Shipped to a machine with autosqueeze and the model's class but not the search's
    factory: a channel-pruned artifact loads given an example input, and without one is
    refused with what to pass, not a traceback."""
    import subprocess
    import sys

    plan = Plan(
        {"features.2": LayerPlan(bits=8, prune_channels=0.5), "classifier.1": LayerPlan(bits=4)}
    )
    x = example_input()
    compressed = compress(pretrained_cnn(), plan, Target("cpu", x))
    save_artifact(compressed, tmp_path / "model.safetensors")
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "elsewhere.py").write_text(ELSEWHERE)
    run = subprocess.run(
        [sys.executable, "elsewhere.py", "model.safetensors", "x.pt", "out.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        "refused: model.safetensors: its plan removes channels or heads (features.2)" in run.stdout
    )
    assert "Target(device, example_input)" in run.stdout
    want = load_artifact(tmp_path / "model.safetensors", DigitsCNN(), Target("cpu", x))(x)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want)


def test_the_bit_packed_form_loads_the_same_model_and_shows_what_coding_saved(tmp_path):
    model = pretrained_cnn()
    names = ["features.0", "features.2", "features.5", "classifier.1", "classifier.3"]
    names = [
        n for n in names if isinstance(model.get_submodule(n), (torch.nn.Linear, torch.nn.Conv2d))
    ]
    coded = tmp_path / "coded.safetensors"  # 4-bit levels after pruning: skewed, coding pays
    save_artifact(compress(model, Plan.uniform(names, bits=4, prune=0.5)), coded)
    layouts = {m["layout"] for m in _encodings(coded).values() if "layout" in m}
    assert "coded" in layouts
    packed = bit_packed_bytes(coded)
    assert len(stored_bytes(packed)) > len(stored_bytes(coded))  # before deflate
    assert "coded" not in {m.get("layout") for m in _encodings(packed).values()}
    a, b = load_artifact(coded, pretrained_cnn()), load_artifact(packed, pretrained_cnn())
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), key  # the same levels, the same weights
    plain = tmp_path / "plain.safetensors"  # fp32: nothing coded, nothing to undo
    save_artifact(compress(model, Plan({})), plain)
    assert bit_packed_bytes(plain) == plain.read_bytes()


def _encodings(source) -> dict:
    data = stored_bytes(source)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return json.loads(header["__metadata__"]["encodings"])


class _Versioned(torch.nn.Module):
    """A module that reads its saved version when it loads, as torchvision's MNASNet does:
    a state dict read from safetensors carries none."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError("version should be set to 1 or 2")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_module_that_reads_its_version_loads_from_an_artifact_and_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from autosqueeze.problem.task import _load_checkpoint

    model = _Versioned().eval()
    plan = Plan({"body.0": LayerPlan(bits=4), "body.2": LayerPlan(bits=8)})
    path = tmp_path / "m.safetensors"
    save_artifact(compress(model, plan), path)
    loaded = load_artifact(path, _Versioned())
    x = torch.randn(3, 8)
    assert (loaded(x) - model(x)).abs().max() < 0.2

    save_file(model.state_dict(), tmp_path / "checkpoint.safetensors")
    fresh = _Versioned()
    torch.nn.init.zeros_(fresh.body[0].weight)
    _load_checkpoint(fresh, tmp_path / "checkpoint.safetensors")
    assert torch.equal(fresh(x), model(x))
