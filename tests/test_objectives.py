"""The objective registry: every objective's facts in one place, read by the config, the
study's constraints, the front and the dashboard, which draws whatever objectives a study has."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import optuna
import pytest
from conftest import study_config, write_yaml

from autosqueeze.cli import main
from autosqueeze.examples.digits import pretrained_cnn
from autosqueeze.measuring.measure import Measurements
from autosqueeze.results.front import normalized, reference_point
from autosqueeze.settings.config import Budgets, StudyConfig, load_config
from autosqueeze.settings.objectives import OBJECTIVES, Objective
from autosqueeze.studies.records import records, reference
from autosqueeze.studies.study import constraints, objective_values, open_study
from autosqueeze.views.study_view import study_view

CHROMIUM = "/usr/bin/chromium"


def test_each_objective_is_measured_budgeted_and_offered_by_the_config(tmp_path):
    for name, objective in OBJECTIVES.items():
        assert name in Measurements.__dataclass_fields__ or objective.measure is not None
        assert objective.budget is None or objective.budget in Budgets.model_fields
        data = study_config(tmp_path, objectives=["metric", name] if name != "metric" else [name])
        StudyConfig.model_validate({**data, "source": tmp_path / "s.yaml"})  # offered


def parameters(model, task) -> float:
    """A toy objective: the loaded model's parameter count (as its execution form holds it)."""
    return float(sum(p.numel() for p in model.parameters()))


@pytest.fixture
def parameters_objective():
    """``parameters`` in the registry for one test, as one entry in objectives.py would be."""
    OBJECTIVES["parameters"] = Objective(
        name="parameters",
        direction="minimize",
        label="parameters",
        display_scale=1.0,
        budget=None,
        budget_scale=1.0,
        constraint="parameters",
        optuna_name="parameters",
        hv_bound=1.5,
        log_axis=True,
        study_value=lambda got: got.parameters,
        cost=lambda got, ref: got.parameters / ref.parameters,
        measure=parameters,
    )
    yield
    del OBJECTIVES["parameters"]


def test_an_objective_with_its_own_measure_is_one_entry_and_reaches_every_reader(
    tmp_path, capsys, parameters_objective
):
    """An objective added as one registry entry (its facts and how to measure it) is taken
    on every timed trial, is what Optuna optimizes, and shows in front.csv, the front table
    and the dashboard's view, with no other file changed."""
    config_path = write_yaml(
        tmp_path / "s.yaml",
        study_config(
            tmp_path,
            objectives=["metric", "size_bytes", "parameters"],
            search={"trials": 5, "output_dir": str(tmp_path / "run")},
        ),
    )
    assert main(["search", str(config_path), "--no-progress"]) == 0
    assert "parameters" in capsys.readouterr().out  # the front table's column
    config = load_config(config_path)
    study = open_study(config, create=False)
    assert study.metric_names == ["accuracy", "size_bytes", "parameters"]
    timed = [r for r in records(study) if r.state == "COMPLETE" and r.measurements]
    assert timed and all(r.measurements.parameters > 0 for r in timed)
    original = reference(study)
    assert original.parameters == parameters(pretrained_cnn(), None)
    for trial in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        assert trial.values[2] == trial.user_attrs["extra"]["parameters"]
    with (tmp_path / "run" / "front.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(row["parameters"]) > 0 for row in rows)
    view = study_view(config, config_path, study)
    assert [o["name"] for o in view["objective_info"]] == config.objectives
    assert all(t["parameters"] > 0 for t in view["trials"] if t["state"] == "COMPLETE")


def test_slack_values_and_costs_follow_each_objectives_direction(tmp_path):
    config = load_config(
        write_yaml(
            tmp_path / "s.yaml",
            study_config(
                tmp_path,
                objectives=["metric", "size_bytes", "latency_ms", "memory_mb"],
                budgets={
                    "max_metric_drop": 0.02,
                    "max_size_mb": 0.5,
                    "max_latency_ms": 2.0,
                    "max_memory_mb": 10.0,
                },
            ),
        )
    )
    ref = Measurements(0.98, 800_000, 4.0, memory_mb=20.0)
    got = Measurements(0.97, 600_000, 3.0, memory_mb=5.0, speedup=4.0 / 3.0)
    slack = constraints(config, ref, got)
    assert slack == pytest.approx(
        {"metric_drop": -0.01, "size_mb": 0.1, "latency_ms": 1.0, "memory_mb": -5.0}
    )
    assert objective_values(config, got) == pytest.approx([0.97, 600_000, 0.75, 5.0])
    assert normalized(got, ref, config.objectives) == pytest.approx([0.01, 0.75, 0.75, 0.25])
    assert reference_point(config.objectives, 0.02) == [0.02, 1.0, 1.5, 1.5]
    stopped = Measurements(0.5, 600_000, None, stopped="missed")  # not timed: no slack
    assert set(constraints(config, ref, stopped)) == {"metric_drop", "size_mb"}


@pytest.fixture(scope="module")
def memory_study(tmp_path_factory):
    """A digits study whose objectives are metric, size and memory (no latency)."""
    folder = tmp_path_factory.mktemp("memory")
    path = write_yaml(
        folder / "study.yaml",
        study_config(
            folder,
            objectives=["metric", "size_bytes", "memory_mb"],
            budgets={"max_metric_drop": 0.02, "max_size_mb": 0.4, "max_memory_mb": 50.0},
            search={"trials": 6, "output_dir": str(folder / "run")},
        ),
    )
    assert main(["search", str(path), "--no-progress"]) == 0
    return path


@pytest.mark.slow  # the long tests: python -m pytest -m slow
@pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (.ci/run installs it)",
)
def test_the_dashboard_draws_the_objectives_the_study_has(memory_study, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    report = tmp_path / "report.html"
    assert main(["report", str(memory_study), "-o", str(report)]) == 0
    capsys.readouterr()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_selector("#pareto-size_bytes-memory_mb .scatterlayer .point", timeout=30000)
        ids = page.evaluate("[...document.querySelectorAll('#pairs .plot')].map(e => e.id)")
        assert ids == [
            "pareto-metric-size_bytes",
            "pareto-metric-memory_mb",
            "pareto-size_bytes-memory_mb",
        ]
        axis = page.evaluate(
            "(() => { const l = document.getElementById('pareto-metric-memory_mb').layout;"
            " return [l.yaxis.title.text, l.shapes.map(s => s.y0)]; })()"
        )
        assert axis[0] == "memory (MB)" and 50.0 in axis[1]  # the memory budget's line
        title = page.evaluate("document.getElementById('pareto-3d').layout.title.text")
        assert title == "accuracy, size (kB), memory (MB)"
        page.screenshot(path=str(tmp_path / "memory.png"), full_page=True)
        browser.close()
    assert not errors
