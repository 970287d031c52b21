"""Sampled trials proposed as knapsack plans from the sensitivity table."""

from __future__ import annotations

import numpy as np
from conftest import study_config, write_yaml

from autosqueeze.plans.plan import Plan
from autosqueeze.searching.proposals import BELOW, PROPOSED, Knapsack
from autosqueeze.searching.search import BASELINE, KNAPSACK, run_search
from autosqueeze.searching.sensitivity import SensitivityTable
from autosqueeze.settings.config import load_config


def _knapsack(**kw):
    return Knapsack(None, SensitivityTable(samples=1), None, min_metric=0.9, max_drop=0.01, **kw)


def test_levels_are_drawn_where_the_measured_trials_place_the_budget():
    knapsack, rng = _knapsack(prices_time=False), np.random.default_rng(0)
    # before a fit: up to the largest predicted distortion that met, a third below it
    early = [knapsack.level([(0.01, True), (0.04, True), (0.5, False)], rng) for _ in range(50)]
    assert 0.04 / BELOW <= min(early) and max(early) <= 0.04
    # with both outcomes around a slope: where a plan meets the budget half the time or more
    tried = [(d, d < 0.06) for d in np.geomspace(0.001, 1, 30)] + [(0.03, False), (0.09, True)]
    levels = [knapsack.level(tried, rng) for _ in range(200)]
    assert 0.01 < min(levels) and max(levels) < 0.1
    assert len(set(levels)) > 100  # drawn, not fixed
    # nothing met yet: well below the least that missed
    assert knapsack.level([(0.8, False)], rng) <= 0.1
    assert knapsack.level([], rng) is None  # no trials and no probe losses: no guess


def _search(tmp_path, trials, share):
    """A digits study whose queue is short (2 baselines, 2 knapsack plans, the warm starts),
    so most of its trials are sampled. Latency is neither an objective nor a budget, so no
    plan depends on a timing: what is proposed does not depend on how busy the machine is."""
    sensitivity = {"knapsack_share": share, "candidates": 2, "speed_candidates": 0, "refine": 0}
    config = study_config(
        tmp_path,
        objectives=["metric", "size_bytes"],
        search={"trials": trials},
        sensitivity=sensitivity,
    )
    return run_search(load_config(write_yaml(tmp_path / "s.yaml", config)), progress=False)


def test_a_search_proposes_knapsack_plans_for_the_sampled_trials(tmp_path):
    result = _search(tmp_path, 16, 1.0)
    sampled = [t for t in result.study.trials if not t.user_attrs.get(BASELINE)]
    assert len(sampled) >= 5
    assert all(t.user_attrs.get(PROPOSED) == KNAPSACK for t in sampled)
    plans = {t.user_attrs["plan"] for t in sampled}
    assert len(plans) >= 3  # perturbed: they differ in what they spend the budget on
    table, searched = result.sensitivity, result.searched
    queued = [t for t in result.study.trials if t.user_attrs.get(BASELINE) == KNAPSACK]
    largest = max(t.user_attrs["predicted_distortion"] for t in queued)
    for trial in sampled:
        for name, value in trial.params.items():  # inside the shaped space
            dist = searched.distributions[name]
            assert dist._contains(dist.to_internal_repr(value))
        predicted = table.predicted_distortion(searched, Plan.from_json(trial.user_attrs["plan"]))
        assert predicted is not None and predicted <= 4 * largest
    within = [
        t
        for t in sampled
        if t.user_attrs["metric"] >= result.study.trials[0].user_attrs["metric"] - 0.02
    ]
    assert len(within) >= len(sampled) / 2


def test_without_a_share_the_sampler_alone_samples(tmp_path):
    result = _search(tmp_path, 9, 0.0)  # 7 queued, then the sampler
    assert any(not t.user_attrs.get(BASELINE) for t in result.study.trials)  # some sampled
    assert not any(t.user_attrs.get(PROPOSED) for t in result.study.trials)
