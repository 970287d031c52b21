"""Bad input: every mistake gives exit status 2 and a message naming the field or file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import study_config, write_yaml

from autosqueeze.cli import main


def fails(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("autosqueeze: error: ")
    return err


def test_missing_config_file(tmp_path, capsys):
    assert "missing.yaml does not exist" in fails(capsys, "validate", tmp_path / "missing.yaml")


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: {factory: a:b\n")
    assert "is not valid YAML at line" in fails(capsys, "validate", path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"budget": {"max_size_mb": 1}}, "field 'budget': unknown field"),
        ({"budgets": {"max_size_mb": "big"}}, "field 'budgets.max_size_mb'"),
        ({"budgets": {"max_size_mb": -1}}, "field 'budgets.max_size_mb': Input should be greater"),
        ({"budgets": {"device": "tpu"}}, "field 'budgets.device'"),
        (
            {"objectives": ["metric", "flops"]},
            "field 'objectives': Value error, unknown objective 'flops'",
        ),
        ({"name": "has space"}, "field 'name'"),
        ({"model": {"factory": None}}, "field 'model.factory': Input should be a valid string"),
        ({"task": None}, "field 'task'"),
    ],
)
def test_schema_errors_name_the_field(make_config, capsys, overrides, message):
    assert message in fails(capsys, "validate", make_config(**overrides))


def test_user_code_errors_name_the_field_and_the_line(tmp_path, make_config, capsys):
    (tmp_path / "user_models.py").write_text(
        "def raises():\n    raise ValueError('weights file missing')\n"
        "def not_a_model():\n    return 42\n"
        "def bad_data():\n    return [1, 2, 3]\n"
    )
    err = fails(capsys, "validate", make_config(model={"factory": "user_models:raises"}))
    assert (
        "model.factory" in err and "ValueError: weights file missing (at user_models.py:2)" in err
    )
    err = fails(capsys, "validate", make_config(model={"factory": "user_models:not_a_model"}))
    assert "returned int, not a torch.nn.Module" in err
    err = fails(capsys, "validate", make_config(model={"factory": "user_models:missing"}))
    assert "module 'user_models' has no attribute 'missing'" in err
    err = fails(capsys, "validate", make_config(model={"factory": "no_such_module:build"}))
    assert "model.factory: cannot import module 'no_such_module'" in err
    err = fails(capsys, "validate", make_config(task={"data": "user_models:bad_data"}))
    assert "task.data" in err and "(inputs, targets) pairs" in err
    err = fails(capsys, "validate", make_config(task={"metric": "f1"}))
    assert "task.metric: 'f1' is not a built-in metric" in err
    err = fails(capsys, "validate", make_config(model={"factory": "not-a-ref"}))
    assert "model.factory: expected 'module:callable'" in err


def test_user_code_that_hangs_exits_or_interrupts_at_import_is_named(
    tmp_path, make_config, capsys, monkeypatch
):
    (tmp_path / "hangs.py").write_text("import time\nwhile True:\n    time.sleep(0.05)\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "interrupts.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.setenv("AUTOSQUEEZE_IMPORT_TIMEOUT", "1")
    err = fails(capsys, "validate", make_config(model={"factory": "hangs:build"}))
    assert "model.factory: importing 'hangs' took more than 1 s" in err
    err = fails(capsys, "validate", make_config(model={"factory": "exits:build"}))
    assert "model.factory: importing 'exits' called sys.exit(3)" in err
    err = fails(capsys, "validate", make_config(task={"metric": "interrupts:metric"}))
    assert "task.metric: importing 'interrupts' was interrupted" in err
    monkeypatch.setenv("AUTOSQUEEZE_IMPORT_TIMEOUT", "soon")
    err = fails(capsys, "validate", make_config())
    assert "AUTOSQUEEZE_IMPORT_TIMEOUT: expected seconds, got 'soon'" in err


def test_user_code_that_ends_the_process_at_import_is_named(make_config, tmp_path):
    """Imported in this process, a module calling os._exit(0) ended validate with status 0 and
    no report; it is tried in a child process first. Run as a user runs it: a regression
    must not end the test process too."""
    (tmp_path / "quits.py").write_text("import os\nos._exit(0)\n")
    (tmp_path / "dies.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    ended = "ended the process"
    cases = [
        ("validate", {"model": {"factory": "quits:build"}}, "model.factory: importing 'quits'"),
        ("validate", {"task": {"data": "dies:data"}}, f"task.data: importing 'dies' {ended}"),
        ("search", {"task": {"metric": "quits:metric"}}, "task.metric: importing 'quits'"),
    ]
    for command, override, named in cases:
        run = subprocess.run(
            [sys.executable, "-m", "autosqueeze", command, str(make_config(**override))],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 2 and named in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and not run.stdout
        how = "(killed by SIGKILL)" if "dies" in named else "(exit status 0)"
        assert f"{ended} {how}" in run.stderr, run.stderr


def test_user_code_that_exits_when_called_is_named(make_config, tmp_path):
    """A factory or metric calling os._exit(0) when called (not at import) ended validate
    with status 0 and no report; it is refused as sys.exit is. Run as a user runs it."""
    (tmp_path / "exits.py").write_text(
        "import os, sys\n"
        "def build():\n    os._exit(0)\n"
        "def metric(model, data, device):\n    sys.exit(0)\n"
    )
    for override, named in [
        ({"model": {"factory": "exits:build"}}, "model.factory: 'exits:build' called os._exit(0)"),
        ({"task": {"metric": "exits:metric"}}, "task.metric: 'exits:metric' called sys.exit(0)"),
    ]:
        run = subprocess.run(
            [sys.executable, "-m", "autosqueeze", "validate", str(make_config(**override))],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 2 and named in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_missing_files_are_named(tmp_path, make_config, capsys):
    err = fails(capsys, "validate", make_config(space="nowhere.yaml"))
    assert "space: file" in err and "nowhere.yaml does not exist" in err
    err = fails(
        capsys,
        "validate",
        make_config(
            model={"factory": "autosqueeze.examples.digits:pretrained_cnn", "checkpoint": "gone.pt"}
        ),
    )
    assert "model.checkpoint: file" in err
    config = make_config()
    assert "no study named 'digits-test'" in fails(capsys, "front", config)
    err = fails(capsys, "evaluate", config, "--artifact", tmp_path / "none.safetensors")
    assert "--artifact: " in err and "none.safetensors does not exist" in err


def test_budgets_no_model_can_meet_are_refused_before_searching(make_config, capsys):
    err = fails(capsys, "search", make_config(budgets={"max_size_mb": 0.001}))
    assert "budgets.max_size_mb: no model in this space can be 0.001 MB" in err
    err = fails(capsys, "search", make_config(budgets={"max_latency_ms": 1e-6}))
    assert "budgets.max_latency_ms: no model in this space is likely to run" in err
    err = fails(capsys, "search", make_config(budgets={"max_memory_mb": 0.001}))
    assert "budgets.max_memory_mb: no model in this space runs in 0.001 MB" in err


def test_a_memory_budget_is_a_constraint_and_memory_an_objective(make_config, capsys):
    """The fp32 digits CNN peaks at ~0.85 MB; 0.5 MB admits only models whose weights and
    activations really take less at run time."""
    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.study import open_study

    config = make_config(
        objectives=["metric", "memory_mb"],
        budgets={"max_metric_drop": 0.05, "max_memory_mb": 0.5},
        search={"trials": 10},
    )
    assert main(["search", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    trials = [t for t in open_study(load_config(config), create=False).trials if t.values]
    for t in trials:
        assert t.values[1] == t.user_attrs["memory_mb"] > 0
        within = t.user_attrs["memory_mb"] <= 0.5
        assert (dict(t.constraints)["memory_mb"] <= 0) == within
    assert trials[0].user_attrs["memory_mb"] > 0.5  # the original, fp32
    assert any(t.user_attrs["memory_mb"] <= 0.5 for t in trials)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_named(make_config, capsys):
    assert "budgets.device: 'cuda' is not available" in fails(
        capsys, "validate", make_config(budgets={"device": "cuda"})
    )


def test_export_of_an_unknown_trial(tmp_path, capsys):
    path = write_yaml(
        tmp_path / "s.yaml",
        study_config(tmp_path, search={"trials": 2, "output_dir": str(tmp_path / "run")}),
    )
    assert main(["search", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    err = fails(capsys, "export", path, "--trial", 99, "-o", tmp_path / "x.safetensors")
    assert "--trial: study 'digits-test' has no trial 99" in err
    (tmp_path / "a-file").write_text("")
    err = fails(capsys, "export", path, "--trial", 0, "-o", tmp_path / "a-file" / "x.safetensors")
    assert "-o/--output: cannot write" in err


def test_a_storage_password_is_never_shown(make_config, capsys):
    from autosqueeze.settings.config import load_config
    from autosqueeze.views.study_view import study_view

    url = "postgresql://alice:s3cretPW@127.0.0.1:9/studies?sslpassword=alsoSecret"
    config = make_config(search={"storage": url})
    err = fails(capsys, "front", config)  # nothing listens on port 9
    assert "alice:***@127.0.0.1:9" in err and "s3cretPW" not in err and "alsoSecret" not in err
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "alice:***@" in out and "s3cretPW" not in out and "alsoSecret" not in out
    view = str(study_view(load_config(config), config, None))
    assert "alice:***@" in view and "s3cretPW" not in view and "alsoSecret" not in view


BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("alias bomb", BOMB + "name: *i\n", "values once its aliases are expanded"),
        ("deep nesting", "name: " + "[" * 50_000 + "]" * 50_000 + "\n", "nesting deeper than 64"),
        ("huge value", "name: x\nbudgets: {max_size_mb: '" + "x" * 100_000 + "'}\n", "characters)"),
    ],
)
def test_a_config_cannot_cost_more_than_a_config(tmp_path, capsys, name, text, expected):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    err = fails(capsys, "validate", path)
    assert expected in err and len(err) < 2000, name


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"search": {"seed": -1}}, "search.seed"),
        ({"search": {"seed": 2**80}}, "search.seed"),
        ({"budgets": {"batch_size": 10**9}}, "budgets.batch_size"),
        ({"measure": {"threads": 10**6}}, "measure.threads"),
        ({"search": {"output_dir": "runs/a\x00b"}}, "search.output_dir"),
        ({"search": {"storage": "sqlite:///:memory:"}}, "search.storage"),
        ({"model": {"factory": "builtins:exit"}}, "model.factory"),
        ({"model": {"factory": "exits_on_import:build"}}, "model.factory"),
        ({"budgets": {"max_latency_ms": float("inf")}}, "budgets.max_latency_ms"),
        ({"name": "n" * 1000}, "name"),
        ({"sensitivity": {"samples": 10**9}}, "sensitivity.samples"),
        ({"search": {"storage": "mysql+nothing://x"}}, "'mysql+nothing://x' is not a usable"),
        ({"search": {"storage": "oracle://x"}}, "search.storage: 'oracle' is not a database"),
        ({"search": {"storage": "/"}}, "search.storage: / is not a regular file"),
        ({"compute": {"executor": "kubernetes"}}, "compute.executor: unknown executor"),
        ({"compute": {"executor": "ray", "workers": 0}}, "compute.workers: 0 means in-process"),
        ({"compute": {"workers": 10**6}}, "compute.workers: 1,000,000 evaluators cannot start"),
        ({"budgets": {"max_metric_drop": float("nan")}}, "field 'budgets.max_metric_drop'"),
        ({"budgets": {"max_metric_drop": 1e308}}, "field 'budgets.max_metric_drop': 1e+308 is"),
        (
            {"task": {"data": "x:y", "metric": "fidelity"}, "budgets": {"max_metric_drop": 2.5}},
            "field 'budgets.max_metric_drop': 2.5 is more than fidelity can drop at all (it "
            "runs from -1 to 1)",
        ),
    ],
)
def test_hostile_config_values_are_named_errors(tmp_path, capsys, override, field):
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    config = write_yaml(tmp_path / "study.yaml", study_config(tmp_path, **override))
    err = fails(capsys, "validate", config)
    assert field in err, err


def test_every_built_in_metric_has_its_range():
    from autosqueeze.settings.config import METRIC_RANGES
    from autosqueeze.usercode.metrics import METRICS, REFERENCE_METRICS

    assert set(METRIC_RANGES) == {*METRICS, *REFERENCE_METRICS}


def test_validate_refuses_a_storage_a_search_could_not_write(tmp_path, make_config, capsys):
    """Checked without writing: validate reads, so it creates nothing, not even the folders
    a search would make."""
    (tmp_path / "a-file").write_text("")
    under_a_file = tmp_path / "a-file" / "runs"
    for storage in (f"sqlite:///{under_a_file}/study.db", str(under_a_file / "study.log")):
        err = fails(capsys, "validate", make_config(search={"storage": storage}))
        assert f"search.storage: the study cannot be written to {under_a_file}" in err
        assert f"{tmp_path / 'a-file'} is not a folder" in err
    err = fails(capsys, "validate", make_config(search={"output_dir": str(under_a_file)}))
    assert "search.output_dir: the study cannot be written to" in err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        err = fails(capsys, "validate", make_config(search={"storage": str(locked / "s.log")}))
        assert f"the folder {locked} is not writable" in err
    fresh = tmp_path / "new" / "deeper"
    config = make_config(search={"storage": f"sqlite:///{fresh}/study.db"})
    assert main(["validate", str(config)]) == 0
    assert "compute   inprocess executor, workers: 0\n" in capsys.readouterr().out
    assert not (tmp_path / "new").exists()


def test_a_device_or_a_fifo_given_as_a_file_is_not_said_missing(tmp_path, make_config, capsys):
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)  # opening it would block: it must never be opened
    for odd in ("/dev/zero", fifo, tmp_path):
        assert f"config file {odd} is not a regular file" in fails(capsys, "validate", odd)
    err = fails(capsys, "validate", make_config(space="/dev/zero"))
    assert "space: file /dev/zero is not a regular file" in err
    model = {"factory": "autosqueeze.examples.digits:pretrained_cnn", "checkpoint": str(fifo)}
    err = fails(capsys, "validate", make_config(model=model))
    assert f"model.checkpoint: file {fifo} is not a regular file" in err
    err = fails(capsys, "doctor", make_config(search={"storage": "/dev/zero"}))
    assert "search.storage: /dev/zero is not a regular file" in err


def test_the_executor_is_chosen_through_its_registry(tmp_path):
    from autosqueeze.searching.executors import EXECUTORS, executor_name
    from autosqueeze.settings.config import load_config

    def chosen(**compute):
        config = study_config(tmp_path, compute=compute)
        return executor_name(load_config(write_yaml(tmp_path / "c.yaml", config)))

    assert set(EXECUTORS) == {"inprocess", "ray"}
    assert chosen(workers=0) == "inprocess" and chosen(workers=2) == "ray"
    assert chosen(workers="auto") == "ray"
    assert chosen(executor="inprocess", workers="auto") == "inprocess"
    assert chosen(executor="ray", workers=2) == "ray"
