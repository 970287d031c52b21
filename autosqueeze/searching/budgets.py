"""Budgets the space cannot meet, caught before a search, and explained after one."""

from __future__ import annotations

from collections import Counter

from autosqueeze.artifacts.artifact import artifact_bytes
from autosqueeze.compression.techniques import compress
from autosqueeze.measuring.evaluator import Evaluator
from autosqueeze.problem.task import Task
from autosqueeze.results.front import Front
from autosqueeze.searchspace.space import SearchSpace
from autosqueeze.settings.config import StudyConfig
from autosqueeze.settings.objectives import OBJECTIVES

LATENCY_NOISE = 1.25  # a floor this much above the budget is not measurement noise


def check_reachable(config: StudyConfig, task: Task, space: SearchSpace) -> int:
    """Build the most compressed plan the space allows; fail when even it misses a budget.

    Returns that plan's artifact size in bytes. Built without recovery training: that
    changes weights, not shapes, so neither the bytes nor the speed it is checked for.
    """
    from autosqueeze.common.errors import UserError

    evaluator = Evaluator(task)
    budgets = config.budgets
    size, memory, latency = (OBJECTIVES[n] for n in ("size_bytes", "memory_mb", "latency_ms"))
    try:
        plan = space.most_compressed_plan()
        artifact = artifact_bytes(compress(task.model, plan, task.target))
        nbytes = len(artifact)
        if (limit := size.limit(budgets, None)) is not None and nbytes > limit:
            raise UserError(
                f"budgets.{size.budget}: no model in this space can be {size.budget_of(budgets)} "
                f"MB or smaller; the most compressed plan (every knob at its extreme) is "
                f"{nbytes / size.budget_scale:.4f} MB. Raise the budget or widen the space "
                f"({config.space})."
            )
        if latency.budget_of(budgets) is None and memory.budget_of(budgets) is None:
            return nbytes
        got = evaluator.measure_artifact(artifact)
        if (limit := memory.limit(budgets, None)) is not None and (got.memory_mb or 0.0) > limit:
            raise UserError(
                f"budgets.{memory.budget}: no model in this space runs in "
                f"{memory.budget_of(budgets)} MB at batch size {budgets.batch_size}; the most "
                f"compressed plan (every knob at its extreme, the most compact kernels) peaks "
                f"at {got.memory_mb:.3f} MB."
            )
        limit = latency.limit(budgets, None)
        if (
            limit is not None
            and got.latency_ms is not None
            and got.latency_ms > limit * LATENCY_NOISE
        ):
            raise UserError(
                f"budgets.{latency.budget}: no model in this space is likely to run in "
                f"{latency.budget_of(budgets)} ms on {budgets.device} at batch size "
                f"{budgets.batch_size}; the most compressed plan measures {got.latency_ms:.3f} ms."
            )
        return nbytes
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
