"""Budgets the space cannot meet, caught before a search, and explained after one."""

from __future__ import annotations

from collections import Counter

from autosqueeze.artifact import artifact_bytes
from autosqueeze.config import StudyConfig
from autosqueeze.evaluator import Evaluator
from autosqueeze.front import Front
from autosqueeze.objectives import OBJECTIVES
from autosqueeze.space import SearchSpace
from autosqueeze.task import Task
from autosqueeze.techniques import compress

LATENCY_NOISE = 1.25  # a floor this much above the budget is not measurement noise


def check_reachable(config: StudyConfig, task: Task, space: SearchSpace) -> int:
    """Build the most compressed plan the space allows; fail when even it misses a budget.

    Returns that plan's artifact size in bytes. Built without recovery training: that
    changes weights, not shapes, so neither the bytes nor the speed it is checked for.
    """
    from autosqueeze.errors import UserError

    evaluator = Evaluator(task)
    try:
        plan = space.most_compressed_plan()
        artifact = artifact_bytes(compress(task.model, plan, task.target))
        size = len(artifact)
        budgets = config.budgets
        if budgets.max_size_mb is not None and size > budgets.max_size_mb * 1e6:
            raise UserError(
                f"budgets.max_size_mb: no model in this space can be {budgets.max_size_mb} MB "
                f"or smaller; the most compressed plan (every knob at its extreme) is "
                f"{size / 1e6:.4f} MB. Raise the budget or widen the space ({config.space})."
            )
        if budgets.max_latency_ms is None and budgets.max_memory_mb is None:
            return size
        got = evaluator.measure_artifact(artifact)
        if budgets.max_memory_mb is not None and (got.memory_mb or 0.0) > budgets.max_memory_mb:
            raise UserError(
                f"budgets.max_memory_mb: no model in this space runs in {budgets.max_memory_mb} "
                f"MB at batch size {budgets.batch_size}; the most compressed plan (every knob "
                f"at its extreme, the most compact kernels) peaks at {got.memory_mb:.3f} MB."
            )
        if budgets.max_latency_ms is not None and got.latency_ms is not None:
            latency = got.latency_ms
            if latency > budgets.max_latency_ms * LATENCY_NOISE:
                raise UserError(
                    f"budgets.max_latency_ms: no model in this space is likely to run in "
                    f"{budgets.max_latency_ms} ms on {budgets.device} at batch size "
                    f"{budgets.batch_size}; the most compressed plan measures {latency:.3f} ms."
                )
        return size
    finally:
        evaluator.close()


def explain_empty_front(config: StudyConfig, front: Front) -> str:
    """Why no trial is feasible: which budgets the completed trials missed, how often."""
    completed = [t for t in front.trials if t.measurements is not None]
    if not completed:
        failed = [t for t in front.trials if t.state == "FAIL"]
        reasons = Counter(t.fail_reason for t in failed).most_common(3)
        listed = "; ".join(f"{n}x {r}" for r, n in reasons)
        return (
            f"no trial completed ({len(failed)} failed: {listed}). "
            f"The study is kept in {config.storage_shown}."
        )
    missed = Counter(k for t in completed for k, v in t.constraints.items() if v > 0)
    names = {o.constraint: f"budgets.{o.budget}" for o in OBJECTIVES.values()}
    listed = ", ".join(
        f"{names[k]} missed by {n} of {len(completed)}" for k, n in missed.most_common()
    )
    return (
        f"no model met every budget after {len(completed)} completed trials ({listed}). "
        f"Relax those budgets or run more trials; the study is kept in {config.storage_shown}."
    )
