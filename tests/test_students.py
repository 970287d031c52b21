"""``model.candidates``: smaller students distilled from the original, cached, and searched as
a choice of base model (autosqueeze.problem.students)."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import DEFAULT_SPACE, study_config, write_yaml
from optuna.distributions import CategoricalDistribution

from autosqueeze.common.errors import UserError
from autosqueeze.compression.recovery import Recovery
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.students import build, distilled
from autosqueeze.problem.task import load_task
from autosqueeze.searching.search import BASELINE, run_search
from autosqueeze.searchspace.space import BASE, ORIGINAL, study_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study
from autosqueeze.views.tables import front_table

SHALLOW = "autosqueeze.examples.residual:shallow"


def residual(tmp_path, **overrides):
    """The residual CNN's study with its shallow student (few distillation steps: a test)."""
    fields = {
        "name": "students-test",
        "model": {
            "factory": "autosqueeze.examples.residual:pretrained",
            "candidates": {"shallow": SHALLOW},
            "distill_steps": 30,
        },
        "task": {
            "data": "autosqueeze.examples.residual:loaders",
            "metric": "accuracy",
            "calibration": "autosqueeze.examples.digits:calibration",
        },
        "budgets": {"max_metric_drop": 0.02, "device": "cpu", "runtime": "torch"},
        "recovery": {"steps": 10},
        "sensitivity": {"enabled": False},
        "search": {"trials": 5, "seed": 0, "output_dir": str(tmp_path / "run")},
        **overrides,
    }
    config = study_config(tmp_path, **fields)
    del config["budgets"]["max_size_mb"]
    return load_config(write_yaml(tmp_path / "study.yaml", config))


def test_a_plan_names_its_base_and_reads_it_back_checked():
    plan = Plan({"stem.0": LayerPlan(bits=8)}, base="shallow")
    assert Plan.from_json(plan.to_json()) == plan
    assert "base" not in Plan({"stem.0": LayerPlan(bits=8)}).to_dict()  # the original
    for bad in (5, "../etc", "x" * 65):
        data = {**plan.to_dict(), "base": bad}
        with pytest.raises(ValueError, match="base"):
            Plan.from_dict(data)


def test_a_candidate_is_refused_with_a_message_naming_it(tmp_path):
    with pytest.raises(UserError, match="'original' is not a candidate name|not a candidate name"):
        residual(tmp_path, model={"factory": "x:y", "candidates": {"original": SHALLOW}})
    config = residual(tmp_path)
    no_calibration = config.model_copy(
        update={"task": config.task.model_copy(update={"calibration": None})}
    )
    with pytest.raises(UserError, match="model.candidates: .*task.calibration"):
        load_task(no_calibration)
    (tmp_path / "students_here.py").write_text(
        "import torch\ndef three():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(64, 3))\n"
    )
    three = config.model.model_copy(update={"candidates": {"t": "students_here:three"}})
    wrong = config.model_copy(update={"model": three})
    with pytest.raises(UserError, match=r"model.candidates.t: .*shapes \[\(1, 3\)\].*\(1, 10\)"):
        load_task(wrong)


def test_a_student_is_distilled_once_and_then_read_from_the_cache(tmp_path):
    task = load_task(residual(tmp_path))
    recovery = Recovery(task.calibration, steps=20, lr=1e-3)
    factory = task.candidates["shallow"]
    folder = tmp_path / "students"
    first, cached = distilled("shallow", factory, SHALLOW, task.model, recovery, folder)
    assert not cached and len(list(folder.glob("*.safetensors"))) == 1
    second, cached = distilled("shallow", factory, SHALLOW, task.model, recovery, folder)
    assert cached
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    untrained = task.skeleton("shallow")  # the factory's weights: distillation changed them
    assert not torch.equal(untrained.head.weight, first.head.weight)
    # another setting is another student; a damaged file is distilled again, not believed
    _, cached = distilled("shallow", factory, SHALLOW, task.model, Recovery(task.calibration, 21))
    assert not cached
    path = next(folder.glob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    again, cached = distilled("shallow", factory, SHALLOW, task.model, recovery, folder)
    assert not cached and torch.equal(again.head.weight, first.head.weight)


def test_the_space_chooses_the_base_and_a_student_takes_its_layers_values(tmp_path):
    task = load_task(residual(tmp_path))
    space = study_space(task)
    assert space.distributions[BASE] == CategoricalDistribution([ORIGINAL, "shallow"])
    student_layers = set(space.students["shallow"].layers)
    assert "stage1.1.conv1.0" in space.layers and "stage1.1.conv1.0" not in student_layers
    params = space.nearest_params(bits=4)
    assert params[BASE] == ORIGINAL and space.plan(params).base == ""
    plan = space.plan(params | {BASE: "shallow"})
    assert plan.base == "shallow" and set(plan.layers) == student_layers
    assert {lp.bits for lp in plan.layers.values()} == {4}
    assert space.params_for(plan) is None  # the original's parameters cannot say "student"
    assert space.params_for(space.uniform_plan(bits=8))[BASE] == ORIGINAL
    with pytest.raises(ValueError, match="model.candidates does not name"):
        task.skeleton("deeper")


def test_a_search_compresses_the_students_and_their_files_reproduce(tmp_path):
    config = residual(tmp_path)
    result = run_search(config, progress=False)
    assert "student 'shallow': distilled (30 steps at most)" in result.notes
    trials = {t.user_attrs.get(BASELINE): t for t in result.study.trials}
    assert {"shallow", "shallow-int8"} <= set(trials)
    student = trials["shallow-int8"]
    assert student.params[BASE] == "shallow" and student.state.name == "COMPLETE"
    plan = Plan.from_json(student.user_attrs["plan"])
    assert plan.base == "shallow" and {lp.bits for lp in plan.layers.values()} == {8}
    # a fresh process (no student in memory) distils nothing: the cache has it; the trial's
    # artifact is rebuilt byte for byte and measures as the search did
    task = load_task(config)
    evaluator = Evaluator(task)
    try:
        artifact = evaluator.artifact(plan)
        again = evaluator.measure_artifact(artifact)
    finally:
        evaluator.close()
    assert again.metric == pytest.approx(student.user_attrs["metric"])
    assert again.size_bytes == student.user_attrs["size_bytes"]
    assert len(artifact) < trials["int8"].user_attrs["size_bytes"]  # 6 convs of 10
    # front.csv and the front table say which model each front model compresses
    bases = {t.number: t.params[BASE] for t in result.study.trials}
    with result.front_csv.open() as f:
        for row in csv.DictReader(f):
            assert row["model"] == bases[int(row["trial"])]
    shown = front_table(result.front, "accuracy")
    assert ("model" in shown.splitlines()[0]) == any(m.plan.base for m in result.front.members)
    resumed = run_search(config.with_overrides(trials=6), progress=False)
    assert "student 'shallow': from the cache" in resumed.notes
    assert len(open_study(config, create=False).trials) == 6


def test_validate_lists_the_students(tmp_path, capsys):
    from autosqueeze.cli import main

    config = residual(tmp_path)
    assert main(["validate", str(config.source)]) == 0
    shown = capsys.readouterr().out
    assert "candidate shallow (autosqueeze.examples.residual:shallow):" in shown
    assert DEFAULT_SPACE.name in shown


def test_ray_evaluators_compress_the_student_the_driver_distilled(tmp_path, capsys):
    """The student travels with the task to two Ray evaluators (none distils it again: the
    driver's note says distilled, and the cache holds one file)."""
    from autosqueeze.cli import main

    config = residual(tmp_path, compute={"workers": 2})
    assert main(["search", str(config.source), "--no-progress"]) == 0
    capsys.readouterr()
    trials = open_study(config, create=False).trials
    students = [t for t in trials if t.user_attrs.get(BASELINE) in ("shallow", "shallow-int8")]
    assert len(students) == 2 and all(t.params[BASE] == "shallow" for t in students)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in students)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert len(list((tmp_path / "cache" / "students").glob("*.safetensors"))) == 1


def test_a_library_students_tied_weights_survive_the_cache(tmp_path):
    """transformers' GPT-2 (2 blocks, random weights under a seed) teaches a 1-block GPT-2
    whose head is tied to its embedding: cached once, read back tied and equal."""
    pytest.importorskip("transformers")
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "tests" / "zoo"))
    from transformers import GPT2Config, GPT2LMHeadModel
    from zoo_models import VOCAB, _tokens, build_gpt2

    def one_block():
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=1, n_head=4)
        return GPT2LMHeadModel(config)

    teacher = build_gpt2().eval()
    inputs = [batch for batch, _ in _tokens()]
    recovery = Recovery(inputs, steps=10, lr=1e-3)
    folder = tmp_path / "students"
    first, cached = distilled("one", one_block, "zoo:one_block", teacher, recovery, folder)
    second, again = distilled("one", one_block, "zoo:one_block", teacher, recovery, folder)
    assert not cached and again
    assert second.lm_head.weight is second.transformer.wte.weight
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    start = build(one_block, "model.candidates.one", "zoo:one_block")  # as distilling began
    assert not torch.equal(start.transformer.wte.weight, second.transformer.wte.weight)


@pytest.mark.slow  # the long tests: python -m pytest -m slow
def test_knapsack_proposals_draw_the_base_and_learn_from_the_originals_trials(tmp_path):
    """With the pass: each student gets the original's knapsack plans on its layers; a
    proposal's base is drawn among the original and the students; a student's trial does
    not feed the fit of levels (the table prices the original's layers)."""
    import numpy as np

    from autosqueeze.searching.proposals import Knapsack

    overrides = {
        "sensitivity": {"enabled": True, "candidates": 2, "speed_candidates": 0, "refine": 0},
        "search": {"trials": 8, "seed": 0, "warm_starts": False},
    }
    result = run_search(residual(tmp_path, **overrides), progress=False)
    kinds = [t.user_attrs.get(BASELINE) for t in result.study.trials]
    assert "shallow-knapsack" in kinds and "knapsack" in kinds
    knapsack = Knapsack(
        result.searched, result.sensitivity, result.task.model,
        min_metric=None, max_drop=0.02, prices_time=False,
    )  # fmt: skip
    proposed = [knapsack.propose([], np.random.default_rng(seed)) for seed in range(12)]
    assert {p[BASE] for p in proposed if p} == {ORIGINAL, "shallow"}
    for trial in result.study.trials:
        judged = knapsack._judged(trial)
        assert (judged is None) == (trial.params[BASE] == "shallow" or trial.state.name == "FAIL")
