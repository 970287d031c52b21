"""The front's arithmetic: dominance and hypervolume, on cases worked out by hand."""

from __future__ import annotations

import pytest

from autosqueeze.front import hypervolume, pareto
from autosqueeze.measure import Measurements
from autosqueeze.records import TrialRecord


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
