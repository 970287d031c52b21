"""The Pareto front: feasible trials that no other feasible trial beats on every objective,
and its outputs on disk (``front.csv`` and one folder per model with artifact, plan, metrics).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume  # Optuna's exact WFG; no public alias

from autosqueeze.artifacts.artifact import save_artifact
from autosqueeze.common.errors import UserError
from autosqueeze.measuring.measure import Measurements
from autosqueeze.settings.objectives import OBJECTIVES, extra_objectives
from autosqueeze.studies.records import TrialRecord, one_call_baselines, records, reference

FRONT_COLUMNS = [
    "trial",
    "baseline",
    "model",  # "original", or the model.candidates student the plan compresses
    "metric",
    "metric_drop",
    "size_bytes",
    "compression",
    "latency_ms",
    "speedup",
    "memory_mb",
    "feasible",
    "artifact",
]
"""front.csv's columns; the objectives measured by their own ``measure`` come before
``feasible`` (``front_columns``)."""


def front_columns() -> list[str]:
    extra = [o.name for o in extra_objectives()]
    at = FRONT_COLUMNS.index("feasible")
    return FRONT_COLUMNS[:at] + extra + FRONT_COLUMNS[at:]


@dataclass(frozen=True)
class Front:
    objectives: list[str]
    reference: Measurements | None
    members: list[TrialRecord]  # sorted by size, smallest first
    trials: list[TrialRecord]
    # ONNX Runtime's one-call quantizers, measured beside the trials (a study shipping there)
    one_call: dict[str, Measurements] = field(default_factory=dict)

    def dominating(self, baseline: Measurements) -> TrialRecord | None:
        """The smallest member at least as good as ``baseline`` on every objective (metric,
        bytes, latency, ...): what the search adds over it; None where none is."""
        for member in self.members:
            got = member.measurements
            assert got is not None
            if all(_no_worse(o, got, baseline) for o in self.objectives):
                return member
        return None

    @property
    def feasible(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.feasible]

    def row(self, member: TrialRecord, artifact: str = "") -> dict[str, object]:
        got = member.measurements
        assert got is not None
        row = self.measured_row(got, artifact)
        row["trial"] = member.number
        row["baseline"] = member.baseline or ""
        row["model"] = (member.plan.base if member.plan else "") or "original"
        row["feasible"] = member.feasible
        return row

    def baseline_row(self, name: str, artifact: str = "") -> dict[str, object]:
        """A one-call quantizer's row: no trial, its name as the baseline."""
        return self.measured_row(self.one_call[name], artifact) | {"baseline": f"ort.{name}"}

    def measured_row(self, got: Measurements, artifact: str = "") -> dict[str, object]:
        ref = self.reference
        return {
            "trial": "",
            "baseline": "",
            "model": "original",
            "metric": round(got.metric, 6),
            "metric_drop": round(ref.metric - got.metric, 6) if ref else "",
            "size_bytes": got.size_bytes,
            "compression": round(ref.size_bytes / got.size_bytes, 3) if ref else "",
            "latency_ms": round(_timed(got), 4),
            "speedup": round(_timed(ref) / _timed(got), 3) if ref else "",
            "memory_mb": round(got.memory_mb, 3) if got.memory_mb is not None else "",
            **{o.name: got.extra.get(o.name, "") for o in extra_objectives()},
            "feasible": "",
            "artifact": artifact,
        }


def _timed(got: Measurements) -> float:
    """The latency of a model timed in full: the original, a front member, a baseline (a
    trial stopped before it was timed is no member)."""
    if got.latency_ms is None:
        raise ValueError("a model stopped before it was timed has no latency to report")
    return got.latency_ms


def _no_worse(objective: str, got: Measurements, baseline: Measurements) -> bool:
    """``got`` at least as good as ``baseline`` on ``objective`` (unmeasured: no claim)."""
    mine, theirs = getattr(got, objective, None), getattr(baseline, objective, None)
    if objective in got.extra or objective in baseline.extra:
        mine, theirs = got.extra.get(objective), baseline.extra.get(objective)
    if mine is None or theirs is None:
        return False
    return mine >= theirs if OBJECTIVES[objective].direction == "maximize" else mine <= theirs


def compute_front(study: optuna.Study, objectives: list[str]) -> Front:
    """The study's front: Optuna's ``best_trials`` (the feasible Pareto set of the values it
    was told), read back as records."""
    best = {t.number for t in study.best_trials}
    trials = records(study)
    members = [t for t in trials if t.number in best and t.feasible and t.measurements]
    ref = reference(study)
    return _front(objectives, ref, members, trials, one_call_baselines(study, ref))


def front_of(
    trials: list[TrialRecord],
    ref: Measurements | None,
    objectives: list[str],
    one_call: dict[str, Measurements] | None = None,
) -> Front:
    """The front of records already read (the dashboard keeps them between polls, where
    ``best_trials`` would copy every trial each time); the same set as ``compute_front``'s
    (tested)."""
    members = pareto([t for t in trials if t.feasible and t.measurements], objectives)
    return _front(objectives, ref, members, trials, one_call or {})


def _front(
    objectives: list[str],
    ref: Measurements | None,
    members: list[TrialRecord],
    trials: list[TrialRecord],
    one_call: dict[str, Measurements],
) -> Front:
    members.sort(key=lambda t: (t.measurements.size_bytes, t.number))  # type: ignore[union-attr]
    return Front(objectives, ref, members, trials, one_call)


def pareto(candidates: list[TrialRecord], objectives: list[str]) -> list[TrialRecord]:
    """The candidates no other candidate dominates (at least as good on all, better on one)."""
    if not candidates:
        return []
    signs = np.array([-1.0 if OBJECTIVES[o].direction == "maximize" else 1.0 for o in objectives])
    costs = signs * np.array(
        [[float(getattr(t.measurements, o) or 0.0) for o in objectives] for t in candidates]
    )
    dominated = np.zeros(len(costs), dtype=bool)
    for start in range(0, len(costs), 256):  # [j, i]: j no worse everywhere, better somewhere
        chunk = costs[start : start + 256]
        no_worse = (costs[:, None, :] <= chunk[None, :, :]).all(axis=2)
        better = (costs[:, None, :] < chunk[None, :, :]).any(axis=2)
        dominated[start : start + 256] = (no_worse & better).any(axis=0)
    return [t for t, d in zip(candidates, dominated) if not d]


def normalized(got: Measurements, ref: Measurements, objectives: list[str]) -> list[float]:
    """A trial as costs relative to the uncompressed model, all to be minimized
    (``Objective.cost``): metric drop (absolute), size / original size, latency / original
    latency (as timed side by side), memory / original memory."""
    return [OBJECTIVES[o].cost(got, ref) for o in objectives]


def reference_point(objectives: list[str], max_metric_drop: float | None) -> list[float]:
    """Where hypervolume is measured from (``Objective.hv_bound``): the metric budget (or
    0.05), the original's size, 1.5x the original's latency and memory. Only better models
    add volume."""
    return [
        (max_metric_drop or OBJECTIVES[o].hv_bound) if o == "metric" else OBJECTIVES[o].hv_bound
        for o in objectives
    ]


def hypervolume(points: list[list[float]], ref_point: list[float]) -> float:
    """Exact hypervolume of minimization points (Optuna's WFG); points not better than
    ``ref_point`` on every objective add nothing."""
    inside = [p for p in points if all(a < b for a, b in zip(p, ref_point))]
    if not inside:
        return 0.0
    return float(compute_hypervolume(np.asarray(inside, dtype=float), np.asarray(ref_point)))


def write_front(
    front: Front,
    output_dir: Path,
    artifacts: Iterable[tuple[int, bytes]],
    shipped_as: Callable[[bytes], tuple[str, bytes]] | None = None,
) -> Path:
    """Write ``front.csv`` and ``front/trial-NNNN/{model.safetensors,plan.json,metrics.json}``.

    ``front.csv`` ends with a row for each of ONNX Runtime's one-call quantizers the study
    measured (no trial; ``baselines/NAME.onnx``, written when it was measured).

    ``artifacts`` gives (trial number, artifact bytes) for every member, rebuilt from its
    plan; a rebuilt artifact must have exactly the size the search measured, or the front
    would not be reproducible. With ``shipped_as`` (``budgets.runtime`` other than torch),
    each member's shipped file (its name, its bytes: ``model.onnx``) is written beside the
    artifact, and it is what must have the measured size. The folder is written aside and
    swapped in whole, so a reader (or a second driver finishing the same study) never sees
    half of one.
    """
    folder = output_dir / "front"
    staging = output_dir / f".front-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    members = {m.number: m for m in front.members}
    for number, data in artifacts:
        member = members[number]
        assert member.plan is not None and member.measurements is not None
        name, shipped = shipped_as(data) if shipped_as else ("model.safetensors", data)
        if len(shipped) != member.measurements.size_bytes:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(
                f"trial {number}: its {name} rebuilt from its plan has {len(shipped):,} bytes, "
                f"the search measured {member.measurements.size_bytes:,}, so the front would "
                "not reproduce from its files; the study was measured by another version of "
                "autosqueeze or of the model (or its checkpoint): search into a new --study-dir"
            )
        member_dir = staging / f"trial-{number:04d}"
        save_artifact(data, member_dir / "model.safetensors")
        if shipped_as:
            (member_dir / name).write_bytes(shipped)
        (member_dir / "plan.json").write_text(json.dumps(member.plan.to_dict(), indent=2))
    rows = []
    for member in front.members:
        name = f"trial-{member.number:04d}"
        row = front.row(member, f"{folder.name}/{name}/model.safetensors")
        metrics = {**row, "reference": front.reference.to_dict() if front.reference else None}
        (staging / name / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rows.append(row)
    for name in front.one_call:  # ONNX Runtime's one-call quantizers, for comparison
        onnx_file = output_dir / "baselines" / f"{name}.onnx"
        rows.append(front.baseline_row(name, str(onnx_file.relative_to(output_dir))))
    _swap_in(staging, folder)
    path = output_dir / "front.csv"
    partial = staging.with_suffix(".csv")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=front_columns())
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)
    return path


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging``; when another writer swaps its own in meanwhile, the
    later one wins."""
    for _ in range(5):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
            return
        except OSError:  # another writer's folder landed between the two calls
            continue
    shutil.rmtree(staging, ignore_errors=True)
    raise RuntimeError(f"cannot replace {folder}: another process keeps writing it")
