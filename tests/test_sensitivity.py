"""The sensitivity pass, the size model, the knapsack plans and the early stop (issue 10)."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from conftest import DEFAULT_SPACE, REPO, study_config, write_yaml
from tiny_bert import build as tiny_bert
from tiny_bert import data as tiny_bert_data

from autosqueeze.artifacts.artifact import (
    artifact_bytes,
    artifact_size,
    load_artifact,
    stored_bytes,
)
from autosqueeze.common.nested import samples_in
from autosqueeze.compression.techniques import TECHNIQUES, Target, applied, compress
from autosqueeze.examples.digits import DigitsCNN, example_input, pretrained_cnn
from autosqueeze.examples.residual import ResidualCNN
from autosqueeze.examples.residual import example_input as residual_input
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.measuring.measure import Limits
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.task import load_task
from autosqueeze.searching.executors.inprocess import InProcessExecutor
from autosqueeze.searching.probe import BASE, Probe
from autosqueeze.searching.search import BASELINE, KNAPSACK, run_search, sensitivity_table
from autosqueeze.searching.sensitivity import (
    CHAIN_STOP,
    SPEED_FIRST,
    SensitivityTable,
    budget_level,
    candidate_plans,
    group_options,
    ladder,
    probes_of,
    refined_levels,
    shaped_space,
)
from autosqueeze.searchspace.space import build_space
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import SENSITIVITY, open_study


def random_plans(model, space_file, target, count, seed=0):
    space = build_space(model, space_file, target)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return space, [space.plan(sampler.ask(space.distributions).params) for _ in range(count)]


@pytest.mark.parametrize(
    "make, example, space_file",
    [
        (pretrained_cnn, example_input(), DEFAULT_SPACE),
        (ResidualCNN, residual_input(), DEFAULT_SPACE),  # BatchNorm: an int64 counter too
        # an input to take smoothing's ranges from (bert.yaml offers smooth)
        (tiny_bert, tiny_bert_data()[0][0], REPO / "search_spaces" / "bert.yaml"),
    ],
)
def test_the_predicted_artifact_size_is_the_artifacts_length(make, example, space_file):
    model = make().eval()
    target = Target("cpu", example)
    _, plans = random_plans(model, space_file, target, 6)
    for plan in [Plan(), *plans]:
        compressed = compress(model, plan, target)
        assert artifact_size(compressed) == len(stored_bytes(artifact_bytes(compressed)))


@pytest.mark.parametrize(
    "plan",
    [
        Plan({"features.2": LayerPlan(bits=3, group_size=16)}),
        Plan({"classifier.1": LayerPlan(prune=0.6, rank=0.5, bits=5)}),
        Plan({"classifier.1": LayerPlan(bits=8, kernel="int8_dynamic")}),
        Plan({"features.0": LayerPlan(prune_channels=0.5)}),  # reaches the next layer
    ],
)
def test_a_probe_is_the_model_the_plans_artifact_loads_and_leaves_the_base_as_it_was(plan):
    model, x = pretrained_cnn(), example_input()
    target = Target("cpu", x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_artifact(artifact_bytes(compress(model, plan, target)), DigitsCNN(), target)
    with applied(model, plan, target) as probed, torch.inference_mode():
        assert torch.equal(probed(x), loaded(x))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_pass_resumes_where_it_stopped_and_a_second_run_reuses_it(tmp_path):
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path)))
    task = load_task(config)
    space = build_space(task.model, config.space, task.target)
    executor = InProcessExecutor(task)
    asked: list[int] = []

    class Interrupted(Exception):
        pass

    class Counting:
        """The real executor's probes, counted; cut off after ``stop`` results (as Ctrl-C
        or a crash would)."""

        def __init__(self, stop=None):
            self.stop = stop

        def probes(self, plans):
            asked.append(len(plans))
            for i, item in enumerate(executor.probes(plans)):
                if i == self.stop:
                    raise Interrupted
                yield item

        def timings(self, plans):
            return executor.timings(plans)

        layer_probes = timings  # never asked: the digits CNN is probed by whole model

    study = open_study(config, create=True)
    with pytest.raises(Interrupted):
        sensitivity_table(study, config, space, Counting(stop=10), progress=False)
    saved = SensitivityTable.from_dict(study.user_attrs[SENSITIVITY], 64)
    assert len(saved.drops) + (saved.base is not None) == 10
    first_run = sum(asked)
    table = sensitivity_table(study, config, space, Counting(), progress=False)
    total = len(probes_of(space)) + 1
    assert sum(asked) - first_run == total - 10 - len(table.skipped)  # the rest, once each
    assert table.base is not None and not table.failed
    assert len(table.drops) + len(table.skipped) == total - 1
    fresh = sensitivity_table(
        open_study(config.with_overrides(study_dir=tmp_path / "other"), create=True),
        config,
        space,
        executor,
        progress=False,
    )
    assert fresh.drops == table.drops and fresh.distortions == table.distortions
    before = sum(asked)
    again = sensitivity_table(study, config, space, Counting(), progress=False)
    assert sum(asked) == before and again.drops == table.drops  # nothing measured twice


def test_a_layers_stronger_values_are_not_probed_once_a_weaker_one_broke_it(tmp_path):
    """bits, prune, rank and channels are probed weakest first, in waves across the
    layers; once a value loses far more than the budget, the layer's stronger values of
    that knob are skipped (they would only lose more), and the search never offers them."""
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path)))
    task = load_task(config)
    space = build_space(task.model, config.space, task.target)
    executor = InProcessExecutor(task)
    waves: list[set[str]] = []

    class Recording:
        def probes(self, plans):
            waves.append(set(plans))
            return executor.probes(plans)

        def timings(self, plans):
            return executor.timings(plans)

        layer_probes = timings  # never asked: the digits CNN is probed by whole model

    study = open_study(config, create=True)
    table = sensitivity_table(study, config, space, Recording(), progress=False)
    stop = CHAIN_STOP * config.sensitivity.margin * config.budgets.max_metric_drop
    assert table.skipped and not set(table.skipped) & set(table.drops)
    for key in table.skipped:  # a weaker value of the same layer and knob broke it
        probe = next(p for p in probes_of(space) if p.key == key)
        technique = TECHNIQUES[probe.knob]
        weaker = [
            table.drops.get(p.key, math.inf)
            for p in probes_of(space)
            if (p.group, p.knob) == (probe.group, probe.knob)
            and technique.strength(p.value) < technique.strength(probe.value)
        ]
        assert max(weaker) > stop
        assert table.drop(probe) == math.inf  # never chosen, never offered
    groups = {layer.prefix for layer in space.layers.values()}
    assert all(sum(".bits=" in k for k in wave) <= len(groups) for wave in waves)  # one a layer
    layer = next(iter(space.layers.values()))
    shaped = shaped_space(space, table, config.budgets.max_metric_drop, 1.5, keep=set())
    offered = shaped.layers[layer.name].searched.get("bits")
    assert offered is None or all(
        f"{layer.prefix}.bits={b}" not in table.skipped for b in offered.choices
    )
    saved = SensitivityTable.from_dict(study.user_attrs[SENSITIVITY], 64)
    assert saved.skipped == table.skipped  # kept with the study: a resumed pass skips too


@pytest.mark.parametrize(
    "stored",
    [
        None,
        "garbage",
        {"format": 1},
        {"format": 1, "samples": 64, "drops": [1], "base": 0.9},
        {
            "format": 1,
            "samples": 32,
            "drops": {},
            "distortions": {},
            "failed": {},
            "base": 1.0,
            "seconds": 1.0,
        },
        {  # ours but for a speed that is not a number
            "format": 2,
            "samples": 64,
            "drops": {"a.bits=4": 0.0},
            "distortions": {},
            "failed": {},
            "speeds": {'a.kernel="bf16"': "fast"},
            "layer_ms": {},
            "untimed": {},
            "model_ms": 1.0,
            "base": 1.0,
            "seconds": 1.0,
        },
    ],
)
def test_a_stored_table_that_is_not_ours_is_measured_again_not_believed(stored):
    table = SensitivityTable.from_dict(stored, 64)
    assert table.base is None and not table.drops and not table.failed


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The digits test study's sensitivity table, measured in-process once for the tests
    that read it."""
    tmp_path = tmp_path_factory.mktemp("measured")
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path)))
    task = load_task(config)
    space = build_space(task.model, config.space, task.target)
    study = open_study(config, create=True)
    table = sensitivity_table(study, config, space, InProcessExecutor(task), progress=False)
    return task, space, study, table


def test_knapsack_plans_keep_within_their_predicted_distortion_and_trade_it_for_bytes(measured):
    task, space, _, table = measured
    levels = ladder(table, 6)  # without a budget: from the top down
    assert levels == sorted(levels, reverse=True) and len(levels) == 6
    centred = ladder(table, 5, 0.02)  # from the budget's estimate outwards, safer side first
    assert centred[0] == pytest.approx(budget_level(table, 0.02))
    assert centred[1] < centred[0] < centred[2] and centred[3] < centred[1]
    candidates = candidate_plans(space, table, task.model, levels, speed=0.0)  # bytes alone
    assert len(candidates) >= 4
    for c in candidates:
        assert c.distortion <= c.level * (1 + 1e-9)
        assert space.params_for(c.plan) is not None  # the sampler's space can express it
    sizes = [c.nbytes for c in candidates]  # less distortion allowed, more bytes
    assert sizes == sorted(sizes)
    options = group_options(space, table, task.model)
    cheapest = sum(min(o.nbytes for o in opts) for opts in options.values())
    assert candidates[0].nbytes >= cheapest
    # between the last level that met the budget and the first that did not
    assert refined_levels([(1.0, False), (0.1, False), (0.01, True)], 2) == pytest.approx(
        [0.01 * 10 ** (1 / 3), 0.01 * 10 ** (2 / 3)]
    )


def test_the_pass_times_the_layers_whose_execution_form_a_probe_changes(measured):
    _, space, study, table = measured
    # a kernel or a rank changes how the layer runs; bits and pruning change what it stores;
    # channel pruning reshapes the neighbours (a copy of the model, not timed)
    timed = {
        p.key
        for p in probes_of(space)
        if p.knob in ("kernel", "rank") and p.key not in table.skipped  # never chosen: not timed
    }
    assert timed and set(table.speeds) == timed and set(table.layer_ms) == timed
    assert all(math.isfinite(v) and v > 0 for v in table.speeds.values())
    assert table.model_ms is not None and table.model_ms > 0
    stored = SensitivityTable.from_dict(study.user_attrs[SENSITIVITY], 64)
    assert stored.speeds == table.speeds and stored.model_ms == table.model_ms


def _timed_table(space, speeds: dict[str, float]) -> SensitivityTable:
    """A made-up table: every probe harmless but for a little distortion (a kernel a little
    more), each group's layers 1 ms of a 10 ms model, the kernels in ``speeds`` that much of
    their time."""
    table = SensitivityTable(64, base=1.0, model_ms=10.0)
    for probe in probes_of(space):
        table.drops[probe.key] = 0.0
        table.distortions[probe.key] = 1e-4
        if probe.knob == "kernel":
            table.layer_ms[probe.key] = 1.0
            table.speeds[probe.key] = speeds.get(probe.value, 1.0)
            table.distortions[probe.key] = 3e-4  # speed costs accuracy the bits could use
    return table


def test_the_latency_model_adds_each_groups_change_to_the_original():
    model = pretrained_cnn()
    space = build_space(model, DEFAULT_SPACE, Target("cpu", example_input()))
    table = SensitivityTable(64, base=1.0, model_ms=10.0)
    group = "classifier.1"
    for probe, ms, speed in [
        (Probe(group, "kernel", "int8_dynamic"), 2.0, 0.5),
        (Probe(group, "rank", 0.5), 2.0, 0.8),
    ]:
        table.layer_ms[probe.key], table.speeds[probe.key] = ms, speed
    assert table.predicted_latency(space, space.plan({})) == pytest.approx(1.0)
    plan = space.plan({f"{group}.kernel": "int8_dynamic", f"{group}.rank": 0.5})
    assert table.predicted_latency(space, plan) == pytest.approx(1 + 2.0 * (0.5 * 0.8 - 1) / 10)
    # bits change what is stored, not how it runs
    assert table.predicted_latency(space, space.plan({f"{group}.bits": 4})) == pytest.approx(1.0)
    assert SensitivityTable(64).predicted_latency(space, plan) is None  # no timings
    # the knapsack's options price the same: a layer left as it is costs no time
    for probe in probes_of(space):
        table.distortions.setdefault(probe.key, 1e-4)
    options = {
        (o.values.get("kernel"), o.values.get("rank")): o.ms
        for o in group_options(space, table, model)[group]
        if o.values.get("bits", 32) == 32 and not o.values.get("prune")
    }
    assert options[("fp32", 1.0)] == 0.0
    assert options[("int8_dynamic", 1.0)] == pytest.approx(2.0 * (0.5 - 1))
    assert options[("int8_dynamic", 0.5)] == pytest.approx(2.0 * (0.5 * 0.8 - 1))


def test_speed_first_knapsack_plans_trade_bytes_for_the_kernels_the_timings_favour():
    model = pretrained_cnn()
    space = build_space(model, DEFAULT_SPACE, Target("cpu", example_input()))
    table = _timed_table(space, {"int8_dynamic": 0.3, "bf16": 2.0})
    level = [2e-3]  # room for the int8 kernel on all five layers (3e-4 each), little more
    (size,) = candidate_plans(space, table, model, level)
    (speed,) = candidate_plans(space, table, model, level, SPEED_FIRST)
    assert speed.latency < size.latency <= 1.0 and speed.nbytes >= size.nbytes
    assert speed.distortion <= 2e-3 and size.distortion <= 2e-3
    offered = {
        name
        for name, layer in space.layers.items()
        if "int8_dynamic" in getattr(layer.searched.get("kernel"), "choices", ())
    }
    assert offered and all(speed.plan.layers[n].kernel == "int8_dynamic" for n in offered)
    assert not any(lp.kernel == "bf16" for lp in speed.plan.layers.values())


def test_values_that_alone_break_the_model_leave_the_space():
    model = pretrained_cnn()
    space = build_space(model, DEFAULT_SPACE, Target("cpu", example_input()))
    table = SensitivityTable(64, base=0.98)
    for probe in probes_of(space):
        harmful = (
            probe.knob == "bits"
            and probe.value == 2
            or (probe.knob == "prune" and probe.value >= 0.6)
        )
        table.drops[probe.key] = 0.5 if harmful else 0.0
    shaped = shaped_space(space, table, 0.01, 1.5, keep=set())
    for layer in shaped.layers.values():
        assert 2 not in layer.searched["bits"].choices
        assert layer.searched["prune"].high == pytest.approx(0.5)  # the last probed value kept
        assert layer.searched["rank"] == space.layers[layer.name].searched["rank"]


def test_a_short_search_uses_the_table_tries_the_knapsack_plans_first_and_resumes(tmp_path):
    """A 4-trial study holds the baselines and the first knapsack plans; resumed to 12 trials
    it reuses its table and queues the plans its first run had no room for."""
    config = load_config(
        write_yaml(tmp_path / "s.yaml", study_config(tmp_path, search={"trials": 4}))
    )
    first = run_search(config, progress=False)
    before = [t for t in first.study.trials if t.user_attrs.get(BASELINE)]
    assert len(first.study.trials) == len(before) == 4  # the baselines, then knapsack plans
    result = run_search(config.with_overrides(trials=12), progress=False)
    assert result.sensitivity is not None and result.sensitivity.base is not None
    assert result.sensitivity.drops == first.sensitivity.drops  # the table, kept
    assert result.sensitivity.seconds == pytest.approx(first.sensitivity.seconds, abs=0.01)
    assert any("sensitivity:" in note for note in first.notes)
    stored = result.study.user_attrs[SENSITIVITY]
    assert stored["drops"] == result.sensitivity.drops
    queued = [t for t in result.study.trials if t.user_attrs.get(BASELINE)]
    knapsack = [t for t in queued if t.user_attrs[BASELINE] == KNAPSACK]
    assert len(knapsack) >= 3 and len(knapsack) > sum(
        t.user_attrs[BASELINE] == KNAPSACK for t in before
    )
    assert knapsack[0].number == 2  # right after the two baselines
    assert all(t.user_attrs["predicted_distortion"] > 0 for t in knapsack)
    plans = [t.user_attrs["plan"] for t in queued]
    assert len(plans) == len(set(plans))  # none of the first run's plans twice
    # the pass timed the layers: the plans carry the latency model's prediction, and the
    # speed-first plans take the kernel warm starts' place
    assert all(0 < t.user_attrs["predicted_latency"] for t in knapsack)
    baselines = {t.user_attrs.get(BASELINE) for t in result.study.trials}
    assert not baselines & {"int6-bf16", "int8-dynamic", "int4-kernel"}
    # the searched space is the shaped one: each sampled trial stays inside it
    for trial in result.study.trials:
        for name, value in trial.params.items():
            assert result.searched.distributions[name]._contains(
                result.searched.distributions[name].to_internal_repr(value)
            )


def test_a_trial_clearly_past_the_budget_stops_on_its_first_samples_with_a_reason(tmp_path):
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path)))
    task = load_task(config)
    evaluator = Evaluator(task)
    names = [
        n for n, m in task.model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    ruined = Plan.uniform(names, bits=2, prune=0.9)
    limits = Limits.of(config.budgets, 0.98, early_stop=3.0)
    got = evaluator.evaluate(ruined, limits)
    assert got.stopped and "on the first 64 samples" in got.stopped
    assert "metric" not in got.seconds and "first_look" in got.seconds
    assert got.latency_ms is None and not math.isnan(got.metric)
    fine = evaluator.evaluate(Plan.uniform(names, bits=8), limits)
    assert fine.stopped is None and "metric" in fine.seconds
    assert BASE == "(base)"


def test_a_probe_is_judged_on_exactly_the_first_samples_the_last_batch_cut_to_fit(tmp_path):
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path)))
    task = load_task(config)
    held = [samples_in(inputs) for inputs, _ in task.data]
    assert held[0] > 20  # the cut falls inside the first batch
    first = task.subset(20)
    assert [samples_in(inputs) for inputs, _ in first.data] == [20]
    (inputs, target), (all_inputs, all_targets) = first.data[0], task.data[0]
    assert torch.equal(inputs, all_inputs[:20]) and torch.equal(target, all_targets[:20])
    with torch.inference_mode():
        right = (task.model(all_inputs[:20]).argmax(-1) == all_targets[:20]).float().mean()
    assert first.evaluate_metric(task.model) == pytest.approx(float(right))
    assert task.subset(sum(held)) is task


def test_refinement_closes_in_on_where_the_budget_falls_between_measured_plans(tmp_path):
    config = load_config(
        write_yaml(
            tmp_path / "s.yaml",
            study_config(
                tmp_path,
                search={"trials": 20},
                budgets={"max_metric_drop": 0.005},
                objectives=["metric", "size_bytes"],  # nothing timed decides the plans
            ),
        )
    )
    study = run_search(config, progress=False).study
    limits_min = study.user_attrs["reference"]["metric"] - 0.005
    knapsack = [t for t in study.trials if t.user_attrs.get(BASELINE) == KNAPSACK]
    levels = ladder(
        SensitivityTable.from_dict(study.user_attrs[SENSITIVITY], 64), 6, 0.005
    )  # the first round
    ladder_trials = [t for t in knapsack if t.user_attrs["predicted_distortion"] in levels]
    refined = [t for t in knapsack if t not in ladder_trials]
    met, missed = [], []
    for t in ladder_trials:
        ok = t.user_attrs.get("metric", -1) >= limits_min
        (met if ok else missed).append(t.user_attrs["predicted_distortion"])
    assert 0 < len(refined) <= config.sensitivity.refine
    assert study.user_attrs["refined"] <= config.sensitivity.refine
    low = max(met, default=0.0)
    high = min((d for d in missed if d > low), default=math.inf)
    for trial in refined:  # each round splits what the rounds before left
        assert low < trial.user_attrs["predicted_distortion"] < high
    assert refined[0].number > max(t.number for t in ladder_trials)


def test_the_values_the_queued_plans_use_stay_in_the_shaped_space():
    """Channel pruning probed without the recovery training that follows it looks harmful;
    with calibration data the search keeps the values its channel anchors use."""
    model = pretrained_cnn()
    space = build_space(model, DEFAULT_SPACE, Target("cpu", example_input()))
    table = SensitivityTable(64, base=0.98)
    for probe in probes_of(space):
        harmful = probe.knob == "prune_channels" and probe.value >= 0.25
        table.drops[probe.key] = 0.5 if harmful else 0.0
    keep = {("prune_channels", 0.5), ("prune_channels", 0.625)}
    shaped = shaped_space(space, table, 0.01, 1.5, keep=keep)
    bare = shaped_space(space, table, 0.01, 1.5, keep=set())
    checked = 0
    for name, layer in shaped.layers.items():
        offered = space.layers[name].searched.get("prune_channels")
        if offered is None or offered.high < 0.625:
            continue
        assert layer.searched["prune_channels"].high == pytest.approx(0.625)
        assert bare.layers[name].searched["prune_channels"].high == pytest.approx(0.125)
        checked += 1
    assert checked >= 2


def test_separation_probed_untrained_stays_in_the_shaped_space_where_recovery_follows(tmp_path):
    """A separated conv scores near chance as fitted and close to the original once
    distilled: with calibration data the search keeps the value its warm start uses."""
    from autosqueeze.searching.search import RECOVERED_VALUES

    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        DEFAULT_SPACE.read_text().replace("separable: 0 ", "separable: [0, 1, 2] ")
    )
    space = build_space(pretrained_cnn(), space_file, Target("cpu", example_input()))
    separable = [n for n, layer in space.layers.items() if "separable" in layer.searched]
    assert separable == ["features.2", "features.5"]  # not the one-input stem: that is rank
    table = SensitivityTable(64, base=0.98)
    for probe in probes_of(space):
        table.drops[probe.key] = 0.5 if probe.knob == "separable" else 0.0
    shaped = shaped_space(space, table, 0.01, 1.5, keep=RECOVERED_VALUES)
    bare = shaped_space(space, table, 0.01, 1.5, keep=set())
    for name in separable:
        assert shaped.layers[name].searched["separable"].choices == (0, 1)
        assert "separable" not in bare.layers[name].searched


def test_without_warm_starts_only_the_baselines_come_before_the_sampler(tmp_path):
    """``search.warm_starts: false`` with no sensitivity pass: RandomSampler over the whole
    space after the original and int8, as benchmarks/search_quality.py's random-bare."""
    overrides = {
        "search": {"trials": 5, "sampler": "random", "warm_starts": False},
        "sensitivity": {"enabled": False},
    }
    config = load_config(write_yaml(tmp_path / "s.yaml", study_config(tmp_path, **overrides)))
    result = run_search(config, progress=False)
    kinds = [t.user_attrs.get(BASELINE) for t in result.study.trials]
    assert kinds == ["original", "int8", None, None, None]


@pytest.mark.parametrize(
    "probe",
    [Probe("features.0", "bits", 4), Probe("encoder.layer.0", "kernel", "bf16"),
     Probe("classifier.1", "prune", 0.25)],
)  # fmt: skip
def test_a_probe_key_parses_back_to_its_probe(probe):
    assert Probe.of(probe.key) == probe


@pytest.mark.parametrize("key", [BASE, "bits=4", "features.0.bits", "features.0.bits=four"])
def test_a_key_that_names_no_probe_parses_to_none(key):
    assert Probe.of(key) is None


def test_run_sensitivity_stores_its_table_in_the_study_and_reads_it_back(tmp_path):
    """``run_sensitivity``, ``autosqueeze sensitivity`` called from Python."""
    from autosqueeze.searching.search import run_sensitivity

    rule = {"types": ["Linear"], "names": ["*"], "knobs": {"bits": [3, 8]}}
    space = write_yaml(tmp_path / "space.yaml", {"rules": [rule]})
    data = study_config(tmp_path, space=str(space), objectives=["metric", "size_bytes"])
    config = load_config(write_yaml(tmp_path / "s.yaml", data))
    first = run_sensitivity(config, progress=False)
    assert set(first.space.layers) == {"classifier.1", "classifier.3"}
    stored = open_study(config, create=False).user_attrs[SENSITIVITY]
    assert stored == first.table.to_dict()
    again = run_sensitivity(config, progress=False)  # nothing left to measure
    assert again.table.to_dict() == stored
