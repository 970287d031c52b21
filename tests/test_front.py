"""The front's arithmetic: dominance and hypervolume, on cases worked out by hand, and the
study's front as Optuna finds it."""

from __future__ import annotations

import optuna
import pytest

from autosqueeze.measuring.measure import Measurements
from autosqueeze.results.front import compute_front, front_of, hypervolume, pareto
from autosqueeze.settings.objectives import OBJECTIVES
from autosqueeze.studies.records import TrialRecord, records
from autosqueeze.studies.study import REFERENCE


def record(number: int, metric: float, size: int, latency: float) -> TrialRecord:
    got = Measurements(metric, size, latency, speedup=1.0 / latency)
    return TrialRecord(number, "COMPLETE", got, True, None, None, None, {})


def test_pareto_keeps_what_nothing_beats_everywhere():
    trials = [
        record(0, 0.98, 100, 1.0),
        record(1, 0.97, 50, 1.0),  # smaller
        record(2, 0.97, 60, 1.0),  # beaten by 1
        record(3, 0.99, 200, 2.0),  # best metric
        record(4, 0.97, 50, 1.0),  # ties 1: neither beats the other
        record(5, 0.96, 50, 0.5),  # fastest
    ]
    kept = pareto(trials, ["metric", "size_bytes", "latency_ms"])
    assert [t.number for t in kept] == [0, 1, 3, 4, 5]
    assert [t.number for t in pareto(trials, ["size_bytes"])] == [1, 4, 5]
    assert pareto([], ["metric"]) == []


def test_hypervolume_of_boxes_worked_out_by_hand():
    assert hypervolume([[0.5, 0.5], [0.2, 0.8]], [1, 1]) == pytest.approx(0.31)
    assert hypervolume([[0.1, 0.2, 0.3]], [1, 1, 1]) == pytest.approx(0.9 * 0.8 * 0.7)
    assert hypervolume([[1.5, 0.1]], [1, 1]) == 0.0  # not better than the reference point
    assert hypervolume([], [1, 1]) == 0.0


def test_the_study_front_is_optunas_best_trials_and_the_dashboards_agrees():
    """``compute_front`` reads Optuna's feasible Pareto set; ``front_of`` (the dashboard's,
    on cached records) finds the same members, an infeasible dominating trial left out."""
    objectives = ["metric", "size_bytes", "latency_ms"]
    study = optuna.create_study(directions=[OBJECTIVES[o].direction for o in objectives])
    reference = Measurements(0.99, 1000, 2.0, speedup=1.0)
    study.set_user_attr(REFERENCE, reference.to_dict())
    rows = [  # metric, size, speedup, within budget
        (0.99, 1000, 1.0, True),
        (0.98, 300, 1.0, True),
        (0.97, 300, 1.0, True),  # beaten by the one before
        (0.99, 250, 2.0, False),  # beats them all, but misses a budget
        (0.96, 200, 1.25, True),
        (0.98, 300, 1.0, True),  # ties the second: both stay
        (0.95, 900, 4.0, True),
    ]
    for metric, size, speedup, ok in rows:
        got = Measurements(metric, size, 2.0 / speedup, speedup=speedup)
        study.add_trial(
            optuna.trial.create_trial(
                values=[metric, size, 1.0 / speedup],
                user_attrs=got.to_dict(),
                constraints={"metric": -0.01 if ok else 0.02},
            )
        )
    from_optuna = compute_front(study, objectives)
    from_records = front_of(records(study), reference, objectives)
    assert [m.number for m in from_optuna.members] == [m.number for m in from_records.members]
    assert sorted(m.number for m in from_optuna.members) == [0, 1, 4, 5, 6]


def test_one_call_baselines_read_from_a_storage_skip_what_is_not_measurements(tmp_path):
    """The study attribute the one-call quantizers are kept in comes from a file someone may
    have edited: an entry without numbers is left out, not a crash in the front table."""
    import optuna

    from autosqueeze.measuring.measure import Measurements
    from autosqueeze.studies.records import one_call_baselines
    from autosqueeze.studies.study import ONE_CALL

    study = optuna.create_study(directions=["maximize", "minimize"])
    good = Measurements(0.9, 1000, 2.0, speedup=1.5).to_dict()
    study.set_user_attr(
        ONE_CALL,
        {"quantize_dynamic": good, "quantize_static": {"metric": "x"}, "3": [1], "s": None},
    )
    ref = Measurements(0.95, 4000, 3.0)
    found = one_call_baselines(study, ref)
    assert list(found) == ["quantize_dynamic"]
    assert found["quantize_dynamic"].latency_ms == 2.0  # ref 3.0 ms / speedup 1.5
