"""Property-based tests over what users and strangers hand autosqueeze: config YAML, plan
JSON and artifact bytes. Every input ends in success or a named error (``UserError`` for a
config, ``ValueError``/``OSError`` for a plan or an artifact, which the CLI turns into exit 2),
never another exception; bounded by the inputs' own limits, not by the machine's speed."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autosqueeze.artifacts.artifact import load_artifact, save_artifact, stored_bytes
from autosqueeze.common.errors import UserError
from autosqueeze.compression.techniques import Target, check_plan, compress
from autosqueeze.examples.digits import pretrained_cnn
from autosqueeze.plans.plan import Plan
from autosqueeze.settings.config import load_config

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["int8", "fp32", "bf16", "cpu", "cuda", "../../etc/passwd", "NaN", "auto"])
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


# -- configs ---------------------------------------------------------------------------------

_SECTIONS = {
    "model": ["factory", "example_input"],
    "task": ["data", "metric", "calibration", "output"],
    "budgets": ["max_metric_drop", "max_latency_ms", "max_size_mb", "max_memory_mb", "device",
                "batch_size"],
    "measure": ["warmup", "repeats", "threads"],
    "search": ["trials", "seed", "sampler", "output_dir", "storage", "timeout"],
    "compute": ["workers", "ray_address"],
    "sensitivity": ["enabled", "samples", "speed_candidates", "refine"],
}  # fmt: skip
_config = st.fixed_dictionaries(
    {},
    optional={
        "name": _values,
        "objectives": st.lists(st.sampled_from(["metric", "size_bytes", "latency_ms", "x"]))
        | _values,
        "space": _values,
        **{
            section: st.fixed_dictionaries({}, optional={k: _values for k in keys}) | _values
            for section, keys in _SECTIONS.items()
        },
    },
)


@FUZZ
@given(config=_config)
def test_any_config_is_loaded_or_refused_by_name(tmp_path_factory, config):
    path = tmp_path_factory.mktemp("config") / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        load_config(path)
    except UserError as exc:
        assert 0 < len(str(exc)) < 2000
        assert "Traceback" not in str(exc)


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_as_a_config_is_loaded_or_refused_by_name(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("config") / "study.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    with pytest.raises(UserError):  # nothing this short is a whole config
        load_config(path)


# -- plans -----------------------------------------------------------------------------------

_LAYERS = ["conv1", "conv2", "fc1", "fc2", "nowhere", ""]
_layer_plan = st.fixed_dictionaries(
    {},
    optional={
        "bits": st.sampled_from([2, 3, 4, 8, 16, 32, 1, 0, 64]) | _values,
        "prune": st.floats(-1, 2) | _values,
        "rank": st.floats(-1, 2) | _values,
        "group_size": st.sampled_from([None, 0, 8, 32, 10**9]) | _values,
        "prune_channels": st.floats(-1, 2) | _values,
        "kernel": st.sampled_from(["fp32", "bf16", "int8-dynamic", "int4", "warp9"]) | _values,
        "extra": _values,
    },
)
_plan = st.fixed_dictionaries(
    {
        "format": st.sampled_from([1]) | _values,
        "layers": st.dictionaries(st.sampled_from(_LAYERS), _layer_plan, max_size=4) | _values,
    }
)


@pytest.fixture(scope="module")
def digits_model():
    return pretrained_cnn()


@FUZZ
@given(plan=_plan)
def test_any_plan_is_applied_or_refused_by_name(digits_model, plan):
    try:
        parsed = Plan.from_json(json.dumps(plan))
        check_plan(parsed)
    except ValueError:
        return
    try:
        compressed = compress(digits_model, parsed, Target(example_input=torch.zeros(1, 1, 8, 8)))
    except ValueError:
        return
    finally:  # the user's model is never changed, whatever the plan
        fresh = pretrained_cnn().state_dict()
        assert all(torch.equal(t, fresh[k]) for k, t in digits_model.state_dict().items())
    with torch.no_grad():
        assert compressed.module(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


# -- artifacts -------------------------------------------------------------------------------


class _Bytes:
    """An artifact's bytes, shown by their length (Hypothesis prints a failing test's
    arguments)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<artifact of {len(self.data)} bytes>"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> _Bytes:
    path = tmp_path_factory.mktemp("artifact") / "good.safetensors"
    digits_model = pretrained_cnn()
    names = [n for n, m in digits_model.named_modules() if type(m).__name__ in ("Conv2d", "Linear")]
    plan = Plan.uniform(names, bits=4, prune=0.5)
    save_artifact(compress(digits_model, plan), path)
    return _Bytes(path.read_bytes())


def _load(data: bytes, folder) -> torch.nn.Module:
    path = folder / "fuzzed.safetensors"
    path.write_bytes(data)
    return load_artifact(path, pretrained_cnn())


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 10**6),
    deflated=st.booleans(),
)
def test_a_damaged_artifact_is_refused_by_name(tmp_path_factory, artifact, flips, cut, deflated):
    """Any changed byte or a cut file is refused (the header is checked, the payload is
    digested), shipped deflated or as the safetensors file in it: never loaded as a
    different model."""
    data = bytearray(artifact.data if deflated else stored_bytes(artifact.data))
    for at, xor in {at % len(data): xor for at, xor in flips}.items():
        data[at] ^= xor
    if cut is not None:
        data = data[: cut % len(data)]
    with pytest.raises((ValueError, OSError)):
        _load(bytes(data), tmp_path_factory.mktemp("damaged"))


@FUZZ
@given(
    tensor=st.integers(0, 100),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "extra"]),
    value=_values | st.lists(st.integers(-(2**64), 2**64), max_size=3),
    metadata=st.dictionaries(
        st.sampled_from(["plan", "encodings", "ties", "autosqueeze_format", "sha256", "x"]),
        st.text(max_size=40) | _values.map(json.dumps),
        max_size=2,
    ),
)
def test_a_forged_artifact_header_is_refused_by_name(
    tmp_path_factory, artifact, tensor, field, value, metadata
):
    stored = stored_bytes(artifact.data)  # the safetensors file the shipped one deflates
    n = struct.unpack("<Q", stored[:8])[0]
    header = json.loads(stored[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    name = names[tensor % len(names)]
    header[name] = {**header[name], field: value}
    header["__metadata__"] = {**header["__metadata__"], **metadata}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    forged = struct.pack("<Q", len(text)) + text + stored[8 + n :]
    try:
        loaded = _load(forged, tmp_path_factory.mktemp("forged"))
    except (ValueError, OSError):
        return
    # accepted: then nothing that matters changed (keys that safetensors and autosqueeze
    # ignore, or a value meaning what the genuine one does: no ties, '{}'), and the model is
    # the genuine artifact's, tensor for tensor
    assert field in ("extra", "__metadata__") and set(metadata) <= {"x", "ties"}
    genuine = _load(artifact.data, tmp_path_factory.mktemp("genuine")).state_dict()
    got = loaded.state_dict()
    assert got.keys() == genuine.keys()
    for key, tensor in genuine.items():
        assert torch.equal(got[key], tensor), key
