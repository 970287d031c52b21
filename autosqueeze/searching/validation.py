"""A study checked before it is searched: ``autosqueeze validate``'s procedure, for a Python
user too. Every part a search needs is tried once, cheaply (the storage without opening it,
the executor, the modules in a child process, the model, data and metric, the space, the
smallest model it allows against the budgets), so a mistake is named in seconds rather
than after the first trials; what comes back is what ``validate`` prints."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autosqueeze.common.errors import UserError
from autosqueeze.problem.task import Task, degenerate_warnings, load_task
from autosqueeze.searching.budgets import check_reachable
from autosqueeze.searching.executors import evaluator_capacity, executor_name
from autosqueeze.searching.search import knob_warnings
from autosqueeze.searchspace.space import LayerCoverage, SearchSpace, coverage, study_space
from autosqueeze.settings.config import StudyConfig, check_storage_writable
from autosqueeze.studies.storage import check_storage
from autosqueeze.studies.study import sampler_of
from autosqueeze.usercode.user_code import check_imports


@dataclass(frozen=True)
class StudentCheck:
    """A ``model.candidates`` student as the space sees it."""

    factory: str  # its "module:callable"
    parameters: int
    layers: int  # layers the space searches


@dataclass(frozen=True)
class Validation:
    """What ``validate`` found; a config that fails a check raises a UserError instead."""

    config: StudyConfig
    task: Task
    metric: float  # the original model's, on task.data
    space: SearchSpace
    smallest_bytes: int  # the most compressed plan's artifact (budgets.check_reachable)
    parameters: int  # the original model's
    students: dict[str, StudentCheck]
    sampler: str  # its class name
    knapsack_share: float  # of sampled trials; 0 without the sensitivity pass
    executor: str  # executors.executor_name
    capacity: str  # what the executor can start here ("" where compute.workers says it all)
    coverage: list[LayerCoverage]
    parameters_reached: int  # parameters of layers the space offers a knob
    warnings: list[str]

    @property
    def parameters_total(self) -> int:
        """Parameters of every module holding its own (a tied weight counted once)."""
        return sum(r.parameters for r in self.coverage)


def validate(config: StudyConfig) -> Validation:
    """Check ``config``'s study without searching it; a UserError names the first field or
    file that would make the search fail, and ``warnings`` what would make it poor."""
    check_storage(config)
    check_storage_writable(config)
    executor = executor_name(config)
    capacity = evaluator_capacity(config, executor)
    check_imports(config)  # a module that exits while imported must not pass for "ok"
    sampler = type(sampler_of(config)).__name__
    task = load_task(config)
    metric = task.evaluate_metric(task.model)
    if not isinstance(metric, (int, float)) or not math.isfinite(metric):
        raise UserError(
            f"task.metric: returned {metric!r} for the original model, not a finite number."
        )
    space = study_space(task)
    floor = check_reachable(config, task, space)
    students = {
        name: StudentCheck(
            config.model.candidates[name],
            sum(p.numel() for p in task.skeleton(name).parameters()),
            len(student.layers),
        )
        for name, student in space.students.items()
    }
    rows = coverage(task.model, space)
    total = sum(r.parameters for r in rows)
    covered = sum(r.parameters for r in rows if r.knobs)
    warnings = knob_warnings(space, task)
    if covered < 0.9 * total:
        warnings.append(
            f"the space reaches only {covered / max(total, 1):.0%} of the parameters: the "
            "rest stays fp32 whatever the search does (see the table for why)"
        )
    warnings += degenerate_warnings(task, metric)
    return Validation(
        config=config,
        task=task,
        metric=metric,
        space=space,
        smallest_bytes=floor,
        parameters=sum(p.numel() for p in task.model.parameters()),
        students=students,
        sampler=sampler,
        knapsack_share=config.sensitivity.knapsack_share if config.sensitivity.enabled else 0.0,
        executor=executor,
        capacity=capacity,
        coverage=rows,
        parameters_reached=covered,
        warnings=warnings,
    )
