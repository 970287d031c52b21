"""The Pareto front: feasible trials that no other feasible trial beats on every objective,
and its outputs on disk (``front.csv`` and one folder per model with artifact, plan, metrics).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from autosqueeze.config import DIRECTIONS
from autosqueeze.measure import Measurements
from autosqueeze.plan import Plan
from autosqueeze.study import TrialRecord, records, reference

FRONT_COLUMNS = [
    "trial",
    "baseline",
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


@dataclass(frozen=True)
class Front:
    objectives: list[str]
    reference: Measurements | None
    members: list[TrialRecord]  # sorted by size, smallest first
    trials: list[TrialRecord]

    @property
    def feasible(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.feasible]

    def row(self, member: TrialRecord, artifact: str = "") -> dict[str, object]:
        got = member.measurements
        assert got is not None
        ref = self.reference
        return {
            "trial": member.number,
            "baseline": member.baseline or "",
            "metric": round(got.metric, 6),
            "metric_drop": round(ref.metric - got.metric, 6) if ref else "",
            "size_bytes": got.size_bytes,
            "compression": round(ref.size_bytes / got.size_bytes, 3) if ref else "",
            "latency_ms": round(got.latency_ms, 4),
            "speedup": round(ref.latency_ms / got.latency_ms, 3) if ref else "",
            "memory_mb": round(got.memory_mb, 3) if got.memory_mb is not None else "",
            "feasible": member.feasible,
            "artifact": artifact,
        }


def compute_front(study: optuna.Study, objectives: list[str]) -> Front:
    trials = records(study)
    members = pareto([t for t in trials if t.feasible and t.measurements], objectives)
    members.sort(key=lambda t: (t.measurements.size_bytes, t.number))  # type: ignore[union-attr]
    return Front(objectives, reference(study), members, trials)


def pareto(candidates: list[TrialRecord], objectives: list[str]) -> list[TrialRecord]:
    """The candidates no other candidate dominates (at least as good on all, better on one)."""
    signs = [-1.0 if DIRECTIONS[o] == "maximize" else 1.0 for o in objectives]
    costs = [
        [s * float(getattr(t.measurements, o)) for s, o in zip(signs, objectives)]
        for t in candidates
    ]

    def dominated(i: int) -> bool:
        return any(
            all(a <= b for a, b in zip(costs[j], costs[i])) and costs[j] != costs[i]
            for j in range(len(costs))
            if j != i
        )

    return [t for i, t in enumerate(candidates) if not dominated(i)]


def normalized(got: Measurements, ref: Measurements, objectives: list[str]) -> list[float]:
    """A trial as costs relative to the uncompressed model, all to be minimized:
    metric drop (absolute), size / original size, latency / original latency, memory /
    original memory."""
    costs = {
        "metric": ref.metric - got.metric,
        "size_bytes": got.size_bytes / ref.size_bytes,
        "latency_ms": got.latency_ms / ref.latency_ms,
        "memory_mb": (got.memory_mb or 0.0) / (ref.memory_mb or 1.0),
    }
    return [costs[o] for o in objectives]


def reference_point(objectives: list[str], max_metric_drop: float | None) -> list[float]:
    """Where hypervolume is measured from: the metric budget (or 0.05), the original's
    size, 1.5x the original's latency and memory. Only better models add volume."""
    bounds = {
        "metric": max_metric_drop or 0.05,
        "size_bytes": 1.0,
        "latency_ms": 1.5,
        "memory_mb": 1.5,
    }
    return [bounds[o] for o in objectives]


def hypervolume(points: list[list[float]], ref_point: list[float]) -> float:
    """Exact hypervolume of minimization points; points not better than ``ref_point`` add 0."""
    inside = [p for p in points if all(a < b for a, b in zip(p, ref_point))]
    if not inside:
        return 0.0
    if len(ref_point) == 1:
        return ref_point[0] - min(p[0] for p in inside)
    levels = sorted({p[-1] for p in inside})
    total = 0.0
    for level, top in zip(levels, [*levels[1:], ref_point[-1]]):
        below = [p[:-1] for p in inside if p[-1] <= level]
        total += (top - level) * hypervolume(below, ref_point[:-1])
    return total


def write_front(front: Front, output_dir: Path, build: Callable[[Plan, Path], int]) -> Path:
    """Write ``front.csv`` and ``front/trial-NNNN/{model.safetensors,plan.json,metrics.json}``.

    ``build(plan, path)`` writes a plan's artifact and returns its size; a rebuilt artifact
    must have exactly the size the search measured, or the front would not be reproducible.
    """
    folder = output_dir / "front"
    if folder.exists():
        shutil.rmtree(folder)
    rows = []
    for member in front.members:
        assert member.plan is not None and member.measurements is not None
        member_dir = folder / f"trial-{member.number:04d}"
        artifact = member_dir / "model.safetensors"
        size = build(member.plan, artifact)
        if size != member.measurements.size_bytes:
            raise RuntimeError(
                f"trial {member.number}: the rebuilt artifact has {size} bytes, "
                f"the search measured {member.measurements.size_bytes}"
            )
        (member_dir / "plan.json").write_text(json.dumps(member.plan.to_dict(), indent=2))
        row = front.row(member, str(artifact.relative_to(output_dir)))
        metrics = {**row, "reference": front.reference.to_dict() if front.reference else None}
        (member_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        rows.append(row)
    path = output_dir / "front.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FRONT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
