"""End-to-end runs of the CLI on the built-in digits model, real SQLite, real files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from autosqueeze.cli import main
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def load(config_path):
    return open_study(load_config(config_path), create=False)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One 10-trial search shared by the read-only tests below."""
    from conftest import study_config, write_yaml

    folder = tmp_path_factory.mktemp("searched")
    path = write_yaml(
        folder / "study.yaml",
        study_config(folder, search={"trials": 10, "seed": 0, "output_dir": str(folder / "run")}),
    )
    assert main(["search", str(path), "--no-progress"]) == 0
    return path


def test_a_front_that_would_not_reproduce_is_not_written(searched, tmp_path):
    """A rebuilt file of another size than the one measured (the study measured by another
    version of autosqueeze or of the model) is the user's to resolve, named, and nothing is
    left half written."""
    from autosqueeze.common.errors import UserError
    from autosqueeze.results.front import compute_front, write_front

    config = load_config(searched)
    front = compute_front(load(searched), config.objectives)
    number = front.members[0].number
    with pytest.raises(UserError, match=f"trial {number}: its model.safetensors rebuilt"):
        write_front(front, tmp_path, [(number, b"not the artifact it measured")])
    assert list(tmp_path.iterdir()) == []


def test_search_writes_the_front_and_prints_the_summary(tmp_path, make_config, capsys):
    config = make_config()
    code, out, err = run(capsys, "search", config)  # progress on, to a log (not a terminal)
    assert code == 0
    assert "Smallest model within 0.02 accuracy of the original: trial" in out
    lines = err.splitlines()  # whole lines a log keeps, the last of each phase at its end
    assert "\r" not in err
    assert any(line.startswith("sensitivity: ") and "probe" in line for line in lines)
    assert any(" 8/8 " in line and "trial" in line for line in lines), err
    run_dir = tmp_path / "run"
    rows = list(csv.DictReader((run_dir / "front.csv").open()))
    assert rows and {"trial", "metric", "size_bytes", "latency_ms", "feasible", "artifact"} <= set(
        rows[0]
    )
    for row in rows:
        assert row["feasible"] == "True"
        artifact = run_dir / row["artifact"]
        assert artifact.stat().st_size == int(row["size_bytes"])
        assert (artifact.parent / "plan.json").is_file()
        assert json.loads((artifact.parent / "metrics.json").read_text())["trial"] == int(
            row["trial"]
        )
    trials = load(config).trials
    assert len([t for t in trials if t.state.is_finished()]) == 8  # later queued plans wait
    # the baselines, then the knapsack plans solved from the sensitivity table
    assert [t.user_attrs.get("baseline") for t in trials[:3]] == ["original", "int8", "knapsack"]


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_resume_keeps_finished_trials_and_runs_only_the_rest(tmp_path, storage, capsys):
    from conftest import study_config, write_yaml

    url = str(tmp_path / "j.log") if storage == "journal" else f"sqlite:///{tmp_path}/s.db"
    data = study_config(
        tmp_path, search={"trials": 5, "output_dir": str(tmp_path / "run"), "storage": url}
    )
    config = write_yaml(tmp_path / "study.yaml", data)
    assert run(capsys, "search", config, "--no-progress")[0] == 0
    first = [(t.number, t.params, t.values) for t in load(config).trials]
    code, _, _ = run(capsys, "search", config, "--no-progress", "--trials", "7")
    assert code == 0
    trials = load(config).trials
    assert len(trials) == 7 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert [(t.number, t.params, t.values) for t in trials[:5]] == first
    assert run(capsys, "search", config, "--no-progress", "--trials", "7")[0] == 0
    assert len(load(config).trials) == 7  # nothing left to do, nothing redone
    assert (tmp_path / ("j.log" if storage == "journal" else "s.db")).is_file()


def test_front_json_export_and_evaluate_reproduce_the_search(searched, capsys, tmp_path):
    code, out, _ = run(capsys, "front", searched, "--json")
    assert code == 0
    front = json.loads(out)
    assert front["reference"]["size_bytes"] > 0 and front["front"]
    member = front["front"][0]
    exported = tmp_path / "exported.safetensors"
    code, out, _ = run(capsys, "export", searched, "--trial", member["trial"], "-o", exported)
    assert code == 0 and f"{member['size_bytes']:,} bytes" in out
    assert exported.stat().st_size == member["size_bytes"]
    code, out, _ = run(capsys, "evaluate", searched, "--artifact", exported, "--json")
    assert code == 0
    measured = json.loads(out)
    assert measured["metric"] == pytest.approx(member["metric"], abs=1e-6)
    assert measured["size_bytes"] == member["size_bytes"]
    # the same execution form: its memory (weights at the kernels' widths) is what the search saw
    assert measured["memory_mb"] == pytest.approx(member["memory_mb"], rel=0.02)
    assert measured["study_latency_ms"] > 0 and measured["reference_latency_ms"] > 0
    assert measured["stored_bytes"] >= measured["size_bytes"]  # deflated only when smaller
    assert measured["packed_bytes"] > 0
    code, out, _ = run(capsys, "evaluate", searched, "--artifact", exported)
    assert code == 0 and f"bit-packed without entropy coding: {measured['packed_bytes']}" in out
    code, out, _ = run(capsys, "front", searched)
    assert code == 0 and "accuracy" in out and "smaller" in out


def test_search_and_validate_print_json_alone_on_stdout(make_config, capsys):
    config = make_config(search={"trials": 4})
    code, out, err = run(capsys, "search", config, "--no-progress", "--json")
    assert code == 0
    found = json.loads(out)  # nothing else on stdout
    assert found["trials_run"] == 4 and found["interrupted"] is False
    assert found["front"] and found["reference"]["size_bytes"] > 0
    assert all(Path(row["artifact"]).is_file() for row in found["front"])
    assert found["summary"].startswith("Smallest model within 0.02 accuracy")
    code, out, _ = run(capsys, "validate", config, "--json")
    assert code == 0
    found = json.loads(out)
    assert found["model"]["parameters"] == 188_234 and found["space"]["searched_knobs"] == 29
    assert 0.9 < found["metric"]["original"] <= 1.0
    assert found["parameters_reached"] <= found["parameters"]
    assert any("task.calibration" in w for w in found["warnings"])
    assert {"name", "kind", "parameters", "knobs", "why"} <= set(found["coverage"][0])


def test_validate_reports_the_model_data_and_space(make_config, capsys):
    code, out, _ = run(capsys, "validate", make_config())
    assert code == 0
    assert "188,234 parameters" in out and "29 searched knobs" in out
    # structural knobs without calibration data cannot recover: said, with what to add
    assert "warning: the space offers prune_channels and rank but task.calibration" in out
    calibrated = make_config(
        task={
            "data": "autosqueeze.examples.digits:loaders",
            "metric": "accuracy",
            "calibration": "autosqueeze.examples.digits:calibration",
        }
    )
    code, out, _ = run(capsys, "validate", calibrated)
    assert code == 0 and "warning" not in out


def test_sensitivity_prints_the_table_and_stores_it_for_the_search(make_config, capsys):
    config = make_config()
    code, out, _ = run(capsys, "sensitivity", config, "--json", "--no-progress")
    assert code == 0
    report = json.loads(out)
    assert report["samples"] == 64 and 0.9 < report["base"] <= 1.0
    rows = {(r["group"], r["knob"], r["value"]): r for r in report["rows"]}
    assert (
        rows[("features.0", "bits", 2)]["distortion"]
        > rows[("features.0", "bits", 8)]["distortion"]
    )
    assert all(r["error"] is None for r in report["rows"])
    code, out, _ = run(capsys, "sensitivity", config)  # read back: the same table as text
    assert code == 0 and "features.0" in out and "prune_channels" in out
    assert load(config).user_attrs["sensitivity"]["seconds"] == report["seconds"]


def test_same_seed_same_plans_when_objectives_are_deterministic(tmp_path, capsys):
    from conftest import study_config, write_yaml

    params = []
    for name in ("a", "b"):
        path = write_yaml(
            tmp_path / f"{name}.yaml",
            study_config(
                tmp_path,
                name=f"seeded-{name}",
                objectives=["metric", "size_bytes"],
                search={"trials": 16, "seed": 7, "output_dir": str(tmp_path / name)},
            ),
        )
        # no pass: after the queued starts, the sampler's own trials are what must repeat
        assert main(["search", str(path), "--no-progress", "--no-sensitivity"]) == 0
        params.append([t.params for t in load(path).trials])
    assert params[0] == params[1] and len(params[0]) == 16
    assert sum(not t.user_attrs.get("baseline") for t in load(path).trials) >= 4  # sampled
    capsys.readouterr()


def test_a_nan_metric_fails_only_that_trial(tmp_path, make_config, capsys):
    (tmp_path / "nan_metric.py").write_text(
        "import torch\n"
        "from autosqueeze.usercode.metrics import accuracy\n"
        "def metric(model, data, device):\n"
        "    if isinstance(model.classifier[1], torch.nn.Sequential):  # factorized\n"
        "        return float('nan')\n"
        "    return accuracy(model, data, device)\n"
    )
    config = make_config(task={"metric": "nan_metric:metric"}, search={"trials": 6})
    # the sensitivity pass finds it first: those probes fail, and the knob leaves the space
    code, out, _ = run(capsys, "sensitivity", config, "--json", "--no-progress")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert {(r["group"], r["knob"]) for r in rows if r["error"]} == {("classifier.1", "rank")}
    assert all("metric is nan" in r["error"] for r in rows if r["error"])
    code, out, _ = run(capsys, "search", config, "--no-progress")
    assert code == 0 and "probe(s) failed" in out
    assert all("classifier.1.rank" not in t.params for t in load(config).trials)
    # without the pass, the sampler factorizes: those trials fail, and only those
    config = make_config(
        name="nan-plain", task={"metric": "nan_metric:metric"}, search={"trials": 16}
    )
    code, _, _ = run(capsys, "search", config, "--no-progress", "--no-sensitivity")
    assert code == 0
    trials = load(config).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all("metric is nan" in t.user_attrs["fail_reason"] for t in failed)
    assert trials[0].state.name in ("COMPLETE", "PRUNED") and len(trials) == 16


def test_budgets_no_trial_met_are_explained_and_the_study_kept(make_config, capsys):
    config = make_config(
        budgets={"max_metric_drop": 0.0, "max_size_mb": 0.015}, search={"trials": 4}
    )
    code, _, err = run(capsys, "search", config, "--no-progress")
    assert code == 2
    assert "no model met every budget after 4 completed trials" in err
    assert "budgets.max_size_mb missed by" in err
    assert len(load(config).trials) == 4


@pytest.mark.slow  # the long tests: python -m pytest -m slow
@pytest.mark.parametrize("how", ["kill", "interrupt", "terminate"])
def test_a_killed_or_interrupted_search_resumes(tmp_path, make_config, how):
    import signal
    import time

    from conftest import GATED_METRIC, stop_midway

    (tmp_path / "gated_metric.py").write_text(GATED_METRIC)
    # a hard kill of the in-process driver; Ctrl-C or SIGTERM (what timeout, Slurm and
    # Kubernetes send) of a driver with two Ray evaluators
    compute = {"workers": 0 if how == "kill" else 2}
    sig, code_wanted, reason = {
        "kill": (signal.SIGKILL, -signal.SIGKILL, None),
        "interrupt": (signal.SIGINT, 130, "Ctrl-C"),
        "terminate": (signal.SIGTERM, 143, "SIGTERM"),
    }[how]
    config = make_config(
        task={"metric": "gated_metric:metric"}, search={"trials": 6}, compute=compute
    )
    journal = tmp_path / "run" / "study.log"

    def trials_now():
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))
        )
        return optuna.load_study(study_name="digits-test", storage=storage).trials

    code, err = stop_midway(  # the trials' resume: the pass's own is in test_sensitivity
        ["search", str(config), "--no-progress", "--no-sensitivity"],
        trials_now,
        sig,
        tmp_path / "gated_metric.gate",
    )
    assert code == code_wanted, err
    if reason:
        assert b"Traceback" not in err and b"logging.cc" not in err  # no Ray C++ frames
        interrupted = [t for t in load(config).trials if t.state.name == "FAIL"]
        assert interrupted and reason in interrupted[0].user_attrs["fail_reason"]
        assert not any(t.state.name == "RUNNING" for t in load(config).trials)
        # the evaluators that ran its trials (each trial names its pid) are gone; other
        # processes on the machine are none of this test's business
        pids = {
            int(t.user_attrs["worker"].rsplit("pid ", 1)[1].split()[0])
            for t in load(config).trials
            if "worker" in t.user_attrs
        }
        assert pids, "no trial names the evaluator that ran it"
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in pids if Path(f"/proc/{p}").exists()], "evaluators outlived it"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "autosqueeze",
            "search",
            str(config),
            "--no-progress",
            "--no-sensitivity",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    trials = load(config).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs["requeued"] for t in failed)
    for trial in failed:
        assert "interrupted" in trial.user_attrs["fail_reason"]
        retried = [t for t in trials if t.user_attrs.get("retry_of") == trial.number]
        # its recorded choices are kept (a driver killed while recording them left some out)
        assert len(retried) == 1 and retried[0].params.items() >= trial.params.items()
        assert retried[0].state.name in ("COMPLETE", "PRUNED")
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 6


def test_console_script_help_and_errors_without_traceback(tmp_path):
    help_out = subprocess.run(
        [sys.executable, "-m", "autosqueeze", "--help"], capture_output=True, text=True
    )
    assert help_out.returncode == 0
    for command in ("search", "front", "export", "evaluate", "validate"):
        assert command in help_out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "autosqueeze", "search", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "nope.yaml does not exist" in bad.stderr
    version = subprocess.run(
        [sys.executable, "-m", "autosqueeze", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("autosqueeze 0.")
    for workers, code, said in (("auto", 2, "nope.yaml does not exist"), ("-1", 2, "must be 0")):
        run = subprocess.run(
            [sys.executable, "-m", "autosqueeze", "search", str(tmp_path / "nope.yaml")]
            + ["--workers", workers],
            capture_output=True,
            text=True,
        )
        assert run.returncode == code and said in run.stderr, run.stderr


@pytest.mark.slow  # the long tests: python -m pytest -m slow
def test_two_drivers_share_one_study_without_failing_each_other(tmp_path, make_config):
    from conftest import SLOW_METRIC

    (tmp_path / "slow_metric2.py").write_text(SLOW_METRIC)
    config = make_config(task={"metric": "slow_metric2:metric"}, search={"trials": 10})
    search = ["search", str(config), "--no-progress", "--no-sensitivity"]  # trials are shared
    command = [sys.executable, "-m", "autosqueeze", *search]
    drivers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
    ]
    for proc in drivers:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    trials = load(config).trials
    assert not [t.number for t in trials if t.state.name == "FAIL"]  # nobody failed a live trial
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 10 <= len(finished) <= 11  # the budget is shared (two asks may race for the last)
    assert len({t.user_attrs["driver"] for t in finished}) == 2


def test_one_driver_acts_on_trials_finished_by_several(tmp_path):
    """Once the knapsack plans are all measured, exactly one driver refines (queues more):
    the one that finished the last of them, or any once that one is gone. (Two refining at
    once each saw room for one more plan and left one queued past the budget.)"""
    import os
    import time

    from autosqueeze.studies.drivers import DRIVER, DRIVER_ID, finished_last

    study = optuna.create_study()
    other = f"{DRIVER_ID.split(':')[0]}:{os.getpid()}:another"  # alive: this very process
    gone = f"{DRIVER_ID.split(':')[0]}:999999999:gone"
    study.set_user_attr(f"heartbeat:{other}", time.time())
    for driver in (DRIVER_ID, other):
        trial = study.ask()
        trial.set_user_attr(DRIVER, driver)
        study.tell(trial, 1.0)
    assert not finished_last(study, study.trials)  # the other one finished last, and lives
    assert finished_last(study, study.trials[:1])
    trial = study.ask()
    trial.set_user_attr(DRIVER, gone)
    study.tell(trial, 1.0)
    assert finished_last(study, study.trials)  # finished last, but gone: anyone acts


def test_commands_that_read_never_write_the_storage(tmp_path, make_config, capsys):
    """front, export, report read a journal with a torn last record (a search killed while
    appending) and leave it byte for byte; a file that is not a journal is refused by readers
    and writers alike, untouched."""
    config = make_config(search={"trials": 3})
    assert run(capsys, "search", config, "--no-progress")[0] == 0
    journal = tmp_path / "run" / "study.log"
    with journal.open("ab") as f:
        f.write(b'{"op_code":5,"worker_id":"x","trial_id":0,"user_attr')  # torn mid-append
    torn = journal.read_bytes()
    journal.chmod(0o444)  # another user's study: readable, not writable
    try:
        assert run(capsys, "front", config)[0] == 0
        assert run(capsys, "report", config, "-o", tmp_path / "r.html")[0] == 0
        assert (
            run(capsys, "export", config, "--trial", "0", "-o", tmp_path / "m.safetensors")[0] == 0
        )
    finally:
        journal.chmod(0o644)
    assert journal.read_bytes() == torn

    stranger = tmp_path / "notes.txt"
    stranger.write_bytes(b"not a journal, 30 bytes long.\n")
    for command in (["front", config], ["search", config, "--no-progress"]):
        code, _, err = run(capsys, *command, "--storage", stranger)
        assert code == 2 and "is not an Optuna journal file; nothing was changed" in err
    assert stranger.read_bytes() == b"not a journal, 30 bytes long.\n"
    code, _, err = run(capsys, "front", config, "--storage", tmp_path / "absent.log")
    assert code == 2 and "does not exist" in err and not (tmp_path / "absent.log").exists()


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_second_signal_while_a_search_winds_down_exits_at_once(second):
    """What the search installs once a first signal stopped it (trials being re-queued, Ray
    shutting down): the next signal ends the process there and then, 128 + its number."""
    winding_down = (
        "import os, signal, time\n"
        "from autosqueeze.searching.search import _exit_on_another_signal\n"
        "_exit_on_another_signal()\n"
        f"os.kill(os.getpid(), signal.{second})\n"
        "time.sleep(600)\n"
        "print('still winding down')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", winding_down], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 128 + {"SIGINT": 2, "SIGTERM": 15}[second]
    assert "stopped at once" in done.stderr and "re-queued by the next run" in done.stderr
    assert "still winding down" not in done.stdout and "Traceback" not in done.stderr
