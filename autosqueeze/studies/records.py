"""A study's trials as autosqueeze reads them back: measurements, plan, budgets met, and
the original model's reference measurements.

Latency is stored as each trial's side-by-side ``speedup`` over the original model; the
original's absolute latency is the robust median of every side-by-side timing of it
(``robust_latency``), and each trial's ``latency_ms`` is derived from the two when read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autosqueeze.measuring.measure import Measurements, robust_latency
from autosqueeze.plans.plan import Plan
from autosqueeze.studies.study import BASELINE, FAIL_REASON, ONE_CALL, PLAN, REFERENCE, STOPPED


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as autosqueeze reads it back from the storage."""

    number: int
    state: str
    measurements: Measurements | None  # complete trials; pruned ones without latency/memory
    feasible: bool
    baseline: str | None
    plan: Plan | None
    fail_reason: str | None
    constraints: dict[str, float]

    @classmethod
    def of(cls, trial: FrozenTrial, reference_ms: float | None = None) -> TrialRecord:
        """``reference_ms``: the study's robust latency of the original, from which this
        trial's absolute latency is derived (its speedup is what was measured)."""
        attrs = trial.user_attrs
        measured = all(k in attrs for k in ("metric", "size_bytes"))
        finished = trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        got = _measurements(attrs) if measured and finished else None
        if got is not None and reference_ms is not None:
            got = got.at_reference(reference_ms)
        constraints = dict(trial.constraints)
        return cls(
            number=trial.number,
            state=trial.state.name,
            measurements=got,
            feasible=trial.state == TrialState.COMPLETE
            and all(v <= 0 for v in constraints.values()),
            baseline=attrs.get(BASELINE),
            plan=Plan.from_json(attrs[PLAN]) if PLAN in attrs else None,
            fail_reason=attrs.get(FAIL_REASON) or attrs.get(STOPPED),
            constraints=constraints,
        )


_MEASURED = [f for f in Measurements.__dataclass_fields__ if f != "seconds"]


def _measurements(attrs: dict[str, Any]) -> Measurements:
    found: dict[str, Any] = {k: attrs.get(k) for k in _MEASURED}
    extra = found.get("extra")  # a storage is someone's file: numbers by name, or nothing
    found["extra"] = (
        {k: float(v) for k, v in extra.items() if _number(v) and isinstance(k, str)}
        if isinstance(extra, dict)
        else {}
    )
    return Measurements(**found)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def records(study: optuna.Study) -> list[TrialRecord]:
    trials = study.get_trials(deepcopy=False)
    ref = reference(study, trials)
    ref_ms = ref.latency_ms if ref else None
    return [TrialRecord.of(t, ref_ms) for t in trials]


def trial_states(study: optuna.Study) -> dict[str, int]:
    """How many of ``study``'s trials are in each state (``complete``, ``running``, ...;
    every state, 0 where none)."""
    counts = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def reference(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> Measurements | None:
    """The uncompressed model's measurements, its latency the robust median of every timing
    of it beside a trial (``trials``: the study's, read again when not given)."""
    ref = study.user_attrs.get(REFERENCE)
    if not ref:
        return None
    original = _measurements(ref)
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    samples = reference_timings(original, trials)
    return replace(original, latency_ms=robust_latency(samples) or original.latency_ms)


def one_call_baselines(study: optuna.Study, ref: Measurements | None) -> dict[str, Measurements]:
    """ONNX Runtime's one-call quantizers as the study measured them (a study that ships
    there), their latencies against ``ref``'s, as a trial's are."""
    found = study.user_attrs.get(ONE_CALL)
    if not isinstance(found, dict):
        return {}
    baselines = {}
    for name, attrs in found.items():
        measured = isinstance(attrs, dict) and all(
            _number(attrs.get(k)) for k in ("metric", "size_bytes", "latency_ms")
        )
        if isinstance(name, str) and measured:  # a storage is someone's file
            got = _measurements(attrs)
            baselines[name] = got.at_reference(ref.latency_ms) if ref and ref.latency_ms else got
    return baselines


def reference_timings(original: Measurements, trials: list[FrozenTrial]) -> list[float]:
    """Every side-by-side timing of the original model: the reference evaluation's and each
    complete trial's."""
    first = original.reference_latency_ms or original.latency_ms
    return ([first] if first else []) + [
        t.user_attrs["reference_latency_ms"]
        for t in trials
        if t.state == TrialState.COMPLETE and t.user_attrs.get("reference_latency_ms")
    ]
