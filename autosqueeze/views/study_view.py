"""A study as one JSON-ready value: what the dashboard and the HTML report draw.

Read-only: it opens the storage, never creates a study, and reports a missing or empty
study as a status with a message instead of raising, so a page can wait for a search.
The dashboard polls every two seconds: a ``ViewCache`` keeps what a finished trial cannot
change (its parsed record and plan, the hypervolume series up to it) between polls.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from autosqueeze.common.errors import UserError
from autosqueeze.compression.techniques import TECHNIQUES, technique_for
from autosqueeze.measuring.measure import Measurements
from autosqueeze.results.front import Front, front_of, hypervolume, normalized, reference_point
from autosqueeze.searching.probe import Probe
from autosqueeze.settings.config import StudyConfig
from autosqueeze.settings.objectives import OBJECTIVES, extra_objectives
from autosqueeze.studies.drivers import FINISHED
from autosqueeze.studies.records import TrialRecord, one_call_baselines, reference
from autosqueeze.studies.study import SENSITIVITY, open_study


class StudyReader:
    """Reads one study's view again and again (the dashboard polls), keeping the storage
    open once the study exists so a journal file is read incrementally."""

    def __init__(self, config: StudyConfig, config_arg: str | Path) -> None:
        self.config, self.config_arg = config, config_arg
        self._study: optuna.Study | None = None
        self._cache = ViewCache()

    def open(self) -> None:
        """Open the study if it exists: for a journal file, Optuna replays every record (5 s
        for 1,000 trials), so the server does this once before its first poll."""
        if self._study is None:
            self._study = open_existing(self.config)

    def view(self) -> dict[str, Any]:
        self.open()
        return study_view(self.config, self.config_arg, self._study, self._cache)


class ViewCache:
    """What finished trials cannot change, kept between polls of one study."""

    def __init__(self) -> None:
        self._trials: dict[int, tuple[Any, TrialRecord, dict[str, Any]]] = {}
        self._series_of: list[int] = []  # feasible trial numbers the series covers, in order
        self._series: list[list[float]] = []
        self._nondominated: list[list[float]] = []
        # per knob, each value seen in a plan and how hard it compresses (0-1,
        # ``Technique.strength``): the plan heatmap's colours, keyed as JavaScript's
        # ``String`` writes the value (1.0 as "1")
        self.strengths: dict[str, dict[str, float]] = {knob: {} for knob in TECHNIQUES}

    def trial(self, frozen: optuna.trial.FrozenTrial) -> tuple[TrialRecord, dict[str, Any]]:
        """A trial's record (latency not yet derived) and its plan as the page shows it."""
        cached = self._trials.get(frozen.number)
        if cached is not None and cached[0] == frozen.state:
            return cached[1], cached[2]
        record = TrialRecord.of(frozen)
        plan = _plan(record)
        for values in plan.values():
            for knob, value in values.items():
                key = _js_string(value)
                if key not in self.strengths[knob]:
                    self.strengths[knob][key] = technique_for(knob).strength(value)
        if frozen.state in FINISHED:
            self._trials[frozen.number] = (frozen.state, record, plan)
        return record, plan

    def hypervolume_series(self, front: Front, config: StudyConfig) -> list[list[float]]:
        """Hypervolume of the feasible trials finished so far, after each (by number).
        Extended from the last poll when the new feasible trials come after it."""
        ref_point = reference_point(config.objectives, config.budgets.max_metric_drop)
        feasible = sorted(
            (t for t in front.trials if t.feasible and t.measurements), key=lambda t: t.number
        )
        numbers = [t.number for t in feasible]
        if numbers[: len(self._series_of)] != self._series_of:  # a late trial: start over
            self._series_of, self._series, self._nondominated = [], [], []
        for record in feasible[len(self._series_of) :]:
            point = normalized(record.measurements, front.reference, config.objectives)  # type: ignore[arg-type]
            if not any(_no_worse(p, point) for p in self._nondominated):
                self._nondominated = [p for p in self._nondominated if not _no_worse(point, p)]
                self._nondominated.append(point)
                volume = hypervolume(self._nondominated, ref_point)
            else:
                volume = self._series[-1][1] if self._series else 0.0
            self._series.append([record.number, volume])
            self._series_of.append(record.number)
        return [list(p) for p in self._series]


def _no_worse(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b))


def open_existing(config: StudyConfig) -> optuna.Study | None:
    """The config's study if it exists; None otherwise (nothing is created)."""
    if "://" not in config.storage and not Path(config.storage).is_file():
        return None
    try:
        return open_study(config, create=False)
    except UserError:
        return None


def study_view(
    config: StudyConfig,
    config_arg: str | Path,
    study: optuna.Study | None,
    cache: ViewCache | None = None,
) -> dict[str, Any]:
    """Everything a view needs; ``config_arg`` is the CONFIG to print in CLI lines."""
    base: dict[str, Any] = {
        "name": config.name,
        "storage": config.storage_shown,
        "objectives": list(config.objectives),
        "objective_info": _objective_info(config, None),
        "metric_name": config.metric_name,
        "budgets": config.budgets.model_dump(),
        "export_command": (
            f"autosqueeze export {config_arg} --trial {{n}} -o trial-{{n}}.safetensors"
        ),
        "updated": time.strftime("%H:%M:%S"),
    }
    if study is None:
        return {**base, "status": "missing", "message": _missing(config, config_arg)}
    cache = cache or ViewCache()
    frozen = study.get_trials(deepcopy=False)
    ref = reference(study, frozen)
    records, plans = [], []
    for trial in frozen:
        record, plan = cache.trial(trial)
        if ref is not None and ref.latency_ms is not None and record.measurements is not None:
            record = replace(record, measurements=record.measurements.at_reference(ref.latency_ms))
        records.append(record)
        plans.append(plan)
    one_call = one_call_baselines(study, ref)
    front = front_of(records, ref, config.objectives, one_call)
    on_front = {m.number for m in front.members}
    trials = [_trial(r, p, r.number in on_front) for r, p in zip(records, plans)]
    view = {
        **base,
        "status": "ok" if any(t["state"] == "COMPLETE" for t in trials) else "empty",
        "message": ""
        if trials
        else "The study has no trials yet; they appear here as the search runs.",
        "reference": ref.to_dict() if ref else None,
        "objective_info": _objective_info(config, ref),
        "trials": trials,
        "front": sorted(on_front),
        "one_call": [_one_call(f"ort.{name}", got) for name, got in one_call.items()],
        "hypervolume": cache.hypervolume_series(front, config) if ref else [],
        "sensitivity": _sensitivity(study.user_attrs.get(SENSITIVITY)),
        "knobs": list(TECHNIQUES),
        "knob_strength": cache.strengths,
    }
    return view


def _objective_info(config: StudyConfig, ref: Measurements | None) -> list[dict[str, Any]]:
    """The study's objectives as the page draws them (``Objective.describe``)."""
    return [
        OBJECTIVES[name].describe(config.metric_name, config.budgets, ref)
        for name in config.objectives
    ]


def _sensitivity(stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """The sensitivity table as the heatmap draws it: (group, knob=value, metric lost; None
    where the probe failed, "skipped" where a weaker value already broke the layer), with
    the rows in model order and the columns by knob, then value."""
    if not isinstance(stored, dict) or stored.get("base") is None:
        return None
    cells: list[list[Any]] = []
    groups: dict[str, int] = {}
    columns: dict[str, tuple[str, int, float, str]] = {}
    found = [(key, drop) for key, drop in stored.get("drops", {}).items()]
    found += [(key, None) for key in stored.get("failed", {})]
    found += [(key, "skipped") for key in stored.get("skipped", {})]
    for key, lost in found:
        probe = Probe.of(key)
        if probe is None:  # the unchanged model's own probe
            continue
        raw = json.dumps(probe.value)
        column = f"{probe.knob}={raw.strip(chr(34))}"
        cells.append([probe.group, column, lost])
        groups.setdefault(probe.group, len(groups))  # the drops come in model order
        columns.setdefault(column, (probe.knob, *_value_order(raw)))
    return {
        "samples": stored.get("samples"),
        "base": stored["base"],
        "cells": cells,
        "groups": list(groups),
        "columns": sorted(columns, key=columns.__getitem__),
    }


def _value_order(raw: str) -> tuple[int, float, str]:
    """Numbers ascending, then names as they read."""
    try:
        return (0, float(raw), "")
    except ValueError:
        return (1, 0.0, raw)


def _trial(record: TrialRecord, plan: dict[str, Any], on_front: bool) -> dict[str, Any]:
    got = record.measurements
    return {
        "number": record.number,
        "state": record.state,
        "baseline": record.baseline or "",
        "metric": got.metric if got else None,
        "size_bytes": got.size_bytes if got else None,
        "latency_ms": got.latency_ms if got else None,
        "speedup": got.speedup if got else None,
        "memory_mb": got.memory_mb if got else None,
        **{o.name: got.extra.get(o.name) if got else None for o in extra_objectives()},
        "feasible": record.feasible,
        "on_front": on_front,
        "constraints": record.constraints,
        "fail_reason": record.fail_reason or "",
        "plan": plan,
    }


def _one_call(name: str, got: Measurements) -> dict[str, Any]:
    """ONNX Runtime's one-call quantizer as the page draws it: a point like a trial's, with
    no trial number."""
    return {
        "number": None,
        "baseline": name,
        "metric": got.metric,
        "size_bytes": got.size_bytes,
        "latency_ms": got.latency_ms,
        "speedup": got.speedup,
        "memory_mb": None,
        **{o.name: got.extra.get(o.name) for o in extra_objectives()},
    }


def _plan(record: TrialRecord) -> dict[str, Any]:
    if record.plan is None:
        return {}
    return {
        name: {knob: getattr(lp, knob) for knob in TECHNIQUES}
        for name, lp in record.plan.layers.items()
    }


def _js_string(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _missing(config: StudyConfig, config_arg: str | Path) -> str:
    return (
        f"No study named '{config.name}' in {config.storage_shown} yet. Start one with "
        f"'autosqueeze search {config_arg}'; this page shows it as soon as it exists."
    )
