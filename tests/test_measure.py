"""Measurements a busy machine cannot skew: robust reference latency, disturbed timings taken
again, exact artifact bytes without a file, trials that stop once they miss a budget."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from conftest import study_config, write_yaml

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, save_artifact
from autosqueeze.cli import main
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples.digits import DigitsCNN, example_input, pretrained_cnn
from autosqueeze.measuring.measure import (
    Measurements,
    measure_latency_beside,
    robust_latency,
    usable_cpus,
)
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.settings.config import load_config
from autosqueeze.studies.records import records, reference, reference_timings
from autosqueeze.studies.study import open_study

CPU = torch.device("cpu")


def test_one_disturbed_timing_neither_becomes_nor_moves_the_reference():
    assert robust_latency([380.0, 13.0, 12.0, 14.0, 13.5]) == 13.25
    assert robust_latency([380.0, 13.0]) == 13.0  # a disturbance only ever slows a timing
    assert robust_latency([13.0]) == 13.0 and robust_latency([]) is None


def test_a_disturbed_timing_is_taken_again_and_the_least_disturbed_kept():
    model, x = pretrained_cnn(), example_input()
    calm = measure_latency_beside(model, model, x, CPU, warmup=1, repeats=10, max_spread=1e9)
    assert calm.attempts == 1 and calm.speedup > 0 and calm.reference_ms > 0
    # an original that always runs far slower than it usually does: every timing is disturbed
    slow = measure_latency_beside(
        model, model, x, CPU, warmup=1, repeats=10, max_spread=1e9, expected_reference_ms=1e-9
    )
    assert slow.attempts == 3
    spread = measure_latency_beside(model, model, x, CPU, warmup=1, repeats=10, max_spread=0.0)
    assert spread.attempts == 3  # rounds never agree exactly


def test_the_artifact_bytes_are_the_file_and_load_alike(tmp_path):
    plan = Plan({"features.2": LayerPlan(bits=4, prune=0.5), "classifier.1": LayerPlan(bits=6)})
    compressed = compress(pretrained_cnn(), plan, Target("cpu", example_input()))
    data = artifact_bytes(compressed)
    path = tmp_path / "m.safetensors"
    assert save_artifact(data, path) == len(data) == path.stat().st_size
    assert save_artifact(compressed, tmp_path / "again.safetensors") == len(data)
    from_bytes = load_artifact(data, DigitsCNN())
    from_file = load_artifact(path, DigitsCNN())
    for (k, a), (_, b) in zip(from_bytes.state_dict().items(), from_file.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    with pytest.raises(ValueError, match="not an autosqueeze artifact"):
        load_artifact(b"\x02\x00\x00\x00\x00\x00\x00\x00{}", DigitsCNN())
    for junk in (b"\xff" * 40, data[: len(data) // 2]):  # garbage, a truncated artifact
        (tmp_path / "junk.safetensors").write_bytes(junk)
        for source in (junk, tmp_path / "junk.safetensors"):
            with pytest.raises(ValueError, match="not a|does not fit"):
                load_artifact(source, DigitsCNN())
        assert (tmp_path / "junk.safetensors").read_bytes() == junk  # read, never changed


def test_a_trial_past_a_budget_stops_before_latency_with_its_reason(make_config, capsys):
    config = make_config(search={"trials": 6})  # max_size_mb 0.4: the fp32 original is 0.75
    assert main(["search", str(config), "--no-progress", "--no-sensitivity"]) == 0
    capsys.readouterr()
    study = open_study(load_config(config), create=False)
    by_number = {r.number: r for r in records(study)}
    original = by_number[0]
    assert original.baseline == "original" and original.state == "PRUNED"
    assert "budgets.max_size_mb" in original.fail_reason
    assert original.measurements.metric > 0.9 and original.measurements.latency_ms is None
    assert study.trials[0].user_attrs["seconds"].keys() == {
        "compress",
        "load",
        "first_look",
        "metric",
    }
    timed = [r for r in by_number.values() if r.state == "COMPLETE"]
    assert timed and all(r.measurements.latency_ms > 0 for r in timed)
    assert all(
        {"compress", "load", "metric", "memory", "latency"}
        <= study.trials[r.number].user_attrs["seconds"].keys()
        for r in timed
    )


@contextmanager
def busy_cores():
    """A spinning process on every core this test may use."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cpus())
    ]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_a_busy_machine_at_the_first_timing_leaves_the_stored_figures_alone(tmp_path, capsys):
    space = write_yaml(  # plans that all keep the metric: every trial is timed
        tmp_path / "space.yaml",
        {"rules": [{"types": ["Linear", "Conv2d"], "knobs": {"bits": [6, 8]}}]},
    )
    data = study_config(
        tmp_path,
        space=str(space),
        budgets={"max_metric_drop": 0.05, "max_size_mb": None, "batch_size": 64},
        measure={"warmup": 3, "repeats": 10},
    )
    config = write_yaml(tmp_path / "study.yaml", data)
    quick = ["--no-progress", "--no-sensitivity"]  # the timings of trials are what is read
    with busy_cores():  # the reference and the first trial are timed beside spinning cores
        assert main(["search", str(config), "--trials", "1", *quick]) == 0
    assert main(["search", str(config), "--trials", "6", *quick]) == 0
    capsys.readouterr()
    study = open_study(load_config(config), create=False)
    ref = reference(study)
    original = Measurements(**study.user_attrs["reference"])  # as measured, disturbed
    samples = reference_timings(original, study.get_trials(deepcopy=False))
    disturbed, quiet = samples[:2], samples[2:]  # the reference's and trial 0's
    assert len(quiet) > len(disturbed) and ref.latency_ms == robust_latency(samples)
    # the stored reference is a quiet timing's, whatever the disturbed ones read
    assert min(quiet) <= ref.latency_ms <= max(quiet)
    for record in records(study):
        got = record.measurements
        if record.state == "COMPLETE":  # latency = the robust reference / its own speedup
            assert got.latency_ms == pytest.approx(ref.latency_ms / got.speedup)
    assert disturbed  # the disturbed timings are kept on the study, not thrown away


def test_output_from_below_python_is_silenced_and_python_output_before_it_kept(capfd):
    import os
    import sys

    from autosqueeze.common.quiet import STDERR, STDOUT, silenced

    print("before", flush=False)
    with silenced(STDOUT), silenced(STDERR):
        os.write(1, b"from C++\n")
        os.write(2, b"also from C++\n")
    print("after")
    sys.stderr.write("stderr after\n")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n" and err == "stderr after\n"
