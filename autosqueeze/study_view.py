"""A study as one JSON-ready value: what the dashboard and the HTML report draw.

Read-only: it opens the storage, never creates a study, and reports a missing or empty
study as a status with a message instead of raising, so a page can wait for a search.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna

from autosqueeze.config import StudyConfig
from autosqueeze.errors import UserError
from autosqueeze.front import compute_front, hypervolume, normalized, reference_point
from autosqueeze.study import open_study


class StudyReader:
    """Reads one study's view again and again (the dashboard polls), keeping the storage
    open once the study exists so a journal file is read incrementally."""

    def __init__(self, config: StudyConfig, config_arg: str | Path) -> None:
        self.config, self.config_arg = config, config_arg
        self._study: optuna.Study | None = None

    def view(self) -> dict[str, Any]:
        if self._study is None:
            self._study = open_existing(self.config)
        return study_view(self.config, self.config_arg, self._study)


def open_existing(config: StudyConfig) -> optuna.Study | None:
    """The config's study if it exists; None otherwise (nothing is created)."""
    if "://" not in config.storage and not Path(config.storage).is_file():
        return None
    try:
        return open_study(config, create=False)
    except UserError:
        return None


def study_view(
    config: StudyConfig, config_arg: str | Path, study: optuna.Study | None
) -> dict[str, Any]:
    """Everything a view needs; ``config_arg`` is the CONFIG to print in CLI lines."""
    base: dict[str, Any] = {
        "name": config.name,
        "storage": config.storage,
        "objectives": list(config.objectives),
        "metric_name": config.task.metric.rpartition(":")[2],
        "budgets": config.budgets.model_dump(),
        "export_command": (
            f"autosqueeze export {config_arg} --trial {{n}} -o trial-{{n}}.safetensors"
        ),
        "updated": time.strftime("%H:%M:%S"),
    }
    if study is None:
        return {**base, "status": "missing", "message": _missing(config, config_arg)}
    front = compute_front(study, config.objectives)
    on_front = {m.number for m in front.members}
    trials = [_trial(t, t.number in on_front) for t in front.trials]
    ref = front.reference
    view = {
        **base,
        "status": "ok" if any(t["state"] == "COMPLETE" for t in trials) else "empty",
        "message": ""
        if trials
        else "The study has no trials yet; they appear here as the search runs.",
        "reference": ref.to_dict() if ref else None,
        "trials": trials,
        "front": sorted(on_front),
        "hypervolume": _hypervolume_series(front, config) if ref else [],
    }
    return view


def _trial(record: Any, on_front: bool) -> dict[str, Any]:
    got = record.measurements
    return {
        "number": record.number,
        "state": record.state,
        "baseline": record.baseline or "",
        "metric": got.metric if got else None,
        "size_bytes": got.size_bytes if got else None,
        "latency_ms": got.latency_ms if got else None,
        "memory_mb": got.memory_mb if got else None,
        "feasible": record.feasible,
        "on_front": on_front,
        "constraints": record.constraints,
        "fail_reason": record.fail_reason or "",
        "plan": {
            name: {
                "bits": lp.bits,
                "prune": lp.prune,
                "rank": lp.rank,
                "prune_channels": lp.prune_channels,
                "kernel": lp.kernel,
            }
            for name, lp in record.plan.layers.items()
        }
        if record.plan
        else {},
    }


def _hypervolume_series(front: Any, config: StudyConfig) -> list[list[float]]:
    """Hypervolume of the feasible trials finished so far, after each trial (by number)."""
    ref_point = reference_point(config.objectives, config.budgets.max_metric_drop)
    points: list[list[float]] = []
    series = []
    for record in sorted(front.trials, key=lambda t: t.number):
        if record.feasible and record.measurements:
            points.append(normalized(record.measurements, front.reference, config.objectives))
            series.append([record.number, hypervolume(points, ref_point)])
    return series


def _missing(config: StudyConfig, config_arg: str | Path) -> str:
    return (
        f"No study named '{config.name}' in {config.storage} yet. Start one with "
        f"'autosqueeze search {config_arg}'; this page shows it as soon as it exists."
    )
