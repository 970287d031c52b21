"""What a study can optimize and budget: each measured quantity's facts, written once.

The config's choices, Optuna's directions and axis names, the budgets' constraint slack,
a trial's early stop (``measure.Limits``), the check that a space can meet the budgets
(``budgets.check_reachable``), the front's dominance and hypervolume, and the dashboard's
axes all read ``OBJECTIVES``.
A new objective is one entry here, with ``measure`` (how a loaded model is measured for it;
the value lands in ``Measurements.extra``), and a ``budgets.max_...`` field if it can be
budgeted (docs/extending.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from torch import nn

    # The config imports this module, and the measurements and the task come later in the
    # import order (docs/architecture.md): so this module names none of their types. It reads
    # the config's budgets by field name, and the task only passes through ``measure``.
    Budgets = Any  # config.Budgets
    Task = Any  # task.Task


class Measured(Protocol):
    """What an objective reads of a trial's measurements (``measure.Measurements`` is one)."""

    @property
    def metric(self) -> float: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def latency_ms(self) -> float | None: ...
    @property
    def memory_mb(self) -> float | None: ...
    @property
    def relative_latency(self) -> float | None: ...


def _ratio(field: str) -> Callable[[Measured, Measured], float]:
    return lambda got, ref: (getattr(got, field) or 0.0) / (getattr(ref, field) or 1.0)


@dataclass(frozen=True)
class Objective:
    """One measured quantity: how it is optimized, budgeted, compared and shown."""

    name: str  # in the config's objectives; the ``Measurements`` field (or ``extra`` key)
    direction: Literal["maximize", "minimize"]
    label: str  # an axis's title, in display units
    display_scale: float  # display units per measured unit (bytes -> kB: 1e-3)
    budget: str | None  # the ``Budgets`` field that limits it (None: never budgeted)
    budget_scale: float  # measured units per budget unit (MB -> bytes: 1e6)
    constraint: str  # its key in a trial's constraints (the slack, in budget units)
    optuna_name: str | None  # its name for optuna-dashboard (None: the metric's own)
    hv_bound: float  # the hypervolume's reference, as a cost relative to the original
    log_axis: bool  # plotted on a log scale
    study_value: Callable[[Measured], float]  # what Optuna is told
    cost: Callable[[Measured, Measured], float]  # (got, original) -> relative cost
    # how a loaded model is measured for it, for an objective the evaluator does not
    # measure itself (metric, bytes, latency and memory are taken together): the value is
    # kept in ``Measurements.extra``, taken for studies that optimize or budget it
    measure: Callable[[nn.Module, Task], float] | None = None

    def measured(self, got: Measured) -> float | None:
        value = getattr(got, self.name)
        return None if value is None else float(value)

    def budget_of(self, budgets: Budgets) -> float | None:
        """Its budget as the config gives it, in budget units (None: unbudgeted)."""
        return None if self.budget is None else getattr(budgets, self.budget)

    def limit(self, budgets: Budgets, original: float | None) -> float | None:
        """The budget's bound in measured units, given the original model's value of it
        (None: unbudgeted, or relative to an original not measured yet)."""
        bound = self.budget_of(budgets)
        if bound is None:
            return None
        if self.name == "metric":  # a drop from the original's metric
            return None if original is None else original - bound
        return bound * self.budget_scale

    def slack(self, budgets: Budgets, ref: Measured, got: Measured) -> float | None:
        """How far ``got`` is past the budget, in budget units (<= 0: within; Optuna's
        convention). None: no budget, or not measured (a trial that stopped early)."""
        limit, value = self.limit(budgets, self.measured(ref)), self.measured(got)
        if limit is None or value is None:
            return None
        past = value - limit if self.direction == "minimize" else limit - value
        return past / self.budget_scale

    def describe(self, metric_name: str, budgets: Budgets, ref: Measured | None) -> dict[str, Any]:
        """What a page needs to draw it: its label (the metric's own name for the metric),
        the scale to display units, a log axis or not, and where its budget puts a line (in
        display units; None without one)."""
        limit = self.limit(budgets, None if ref is None else self.measured(ref))
        return {
            "name": self.name,
            "label": metric_name if self.name == "metric" else self.label,
            "scale": self.display_scale,
            "log": self.log_axis,
            "direction": self.direction,
            "budget": None if limit is None else limit * self.display_scale,
        }


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in [
        Objective(
            name="metric",
            direction="maximize",
            label="metric",
            display_scale=1.0,
            budget="max_metric_drop",
            budget_scale=1.0,
            constraint="metric_drop",
            optuna_name=None,
            hv_bound=0.05,  # without a metric budget
            log_axis=False,
            study_value=lambda got: got.metric,
            cost=lambda got, ref: ref.metric - got.metric,  # the drop, absolute
        ),
        Objective(
            name="size_bytes",
            direction="minimize",
            label="size (kB)",
            display_scale=1e-3,
            budget="max_size_mb",
            budget_scale=1e6,
            constraint="size_mb",
            optuna_name="size_bytes",
            hv_bound=1.0,
            log_axis=True,
            study_value=lambda got: got.size_bytes,
            cost=_ratio("size_bytes"),
        ),
        Objective(
            name="latency_ms",
            direction="minimize",
            label="latency (ms)",
            display_scale=1.0,
            budget="max_latency_ms",
            budget_scale=1.0,
            constraint="latency_ms",
            optuna_name="latency_vs_original",
            hv_bound=1.5,
            log_axis=False,
            # as a fraction of the original's, timed side by side: busy moments cancel
            study_value=lambda got: got.relative_latency or 1.0,
            cost=lambda got, ref: (
                got.relative_latency or (got.latency_ms or 0.0) / (ref.latency_ms or 1.0)
            ),
        ),
        Objective(
            name="memory_mb",
            direction="minimize",
            label="memory (MB)",
            display_scale=1.0,
            budget="max_memory_mb",
            budget_scale=1.0,
            constraint="memory_mb",
            optuna_name="memory_mb",
            hv_bound=1.5,
            log_axis=False,
            study_value=lambda got: got.memory_mb or 0.0,
            cost=_ratio("memory_mb"),
        ),
    ]
}
"""Every objective, by name, in the order tables and pages show them."""


def objectives_of(names: list[str]) -> list[Objective]:
    return [OBJECTIVES[n] for n in names]


def extra_objectives() -> list[Objective]:
    """The objectives measured outside the evaluator's own four (``Objective.measure``), in
    registry order: the front's and the page's extra columns."""
    return [o for o in OBJECTIVES.values() if o.measure is not None]
