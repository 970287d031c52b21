"""Sampled trials from the sensitivity table: knapsack plans at calibrated levels.

TPE or random sampling in 50-100 per-layer dimensions sends most trials past the metric
budget: each dimension is drawn on its own, and a few bad draws break the model. The table
already says what each choice costs; what it gets wrong is how choices add up (interactions
make the additive model under-count). ``KnapsackSampler`` therefore proposes, for a share of
the sampled trials (``sensitivity.knapsack_share``), the knapsack plan at a distortion level
where the measured trials say a plan meets the budget with a drawn chance (a logistic fit,
refit at every ask), with each option's bytes and time perturbed (so plans differ in what
they spend the budget on) and, where the study prices time, a random weight of time against
bytes (so they spread along the front). The other asks go to the configured sampler, which
learns from every trial, proposed ones included."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autosqueeze.compression.size_model import SIZE_KNOBS
from autosqueeze.plans.plan import Plan
from autosqueeze.searching.sensitivity import (
    SIZE_FIRST,
    SPEED_FIRST,
    Candidate,
    Option,
    SensitivityTable,
    budget_level,
    candidate_plans,
    group_options,
)
from autosqueeze.searchspace.space import BASE, ORIGINAL, SearchSpace

PROPOSED = "proposed_by"
"""Trial attr: "knapsack" on the sampled trials ``KnapsackSampler`` proposed."""
NOISE = 0.35
"""The spread of each option's perturbed cost: a log-normal factor (about x0.7-x1.4)."""
CHANCES = (0.5, 0.9)
"""The range of the chance of meeting the metric budget a proposal's level is drawn at."""
BELOW = 3.0
"""Before the fit: how far below the largest predicted distortion that met the budget."""
RIDGE = 0.1
"""The logistic fit's ridge penalty: a finite slope when the trials separate cleanly."""
BELOW_BUDGET = 0.3
"""The share of proposals that fill in the front below the budget: a level drawn up to
``SPAN`` times below the calibrated one (the front is a curve, not its far end)."""
SPAN = 100.0


def _chance_fit(tried: list[tuple[float, bool]]) -> tuple[float, float] | None:
    """(a, b) of P(met) = sigmoid(a + b log d) over the trials of positive distortion, by
    Newton's method with a ridge penalty; None unless both outcomes were seen and the
    chance falls as distortion grows (b < 0)."""
    points = [(math.log(d), 1.0 if ok else 0.0) for d, ok in tried if d > 0]
    outcomes = {y for _, y in points}
    if len(points) < 4 or outcomes != {0.0, 1.0}:
        return None
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    centre, spread = float(x.mean()), float(x.std()) or 1.0
    design = np.stack([np.ones_like(x), (x - centre) / spread], axis=1)
    w = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(design @ w)))
        gradient = design.T @ (y - p) - RIDGE * w
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w += step
        if np.abs(step).max() < 1e-8:
            break
    if w[1] >= 0:
        return None
    return float(w[0] - w[1] * centre / spread), float(w[1] / spread)


def _perturbed_all(options: list[Option], rng: np.random.Generator) -> list[Option]:
    """A group's options, each at a drawn factor times its bytes and its change in time:
    plans then differ in what they spend the budget on, while the distortion they spend
    stays true. Options that store the same (they differ in kernel alone) share a factor:
    a kernel that only costs time must not look smaller in bytes than its fp32 twin (on
    the digits CNN, a third of the proposals ran a slower kernel for that reason)."""
    factors: dict[str, float] = {}
    found = []
    for option in options:
        stored = json.dumps({k: option.values[k] for k in SIZE_KNOBS if k in option.values})
        factor = factors.setdefault(stored, float(np.exp(rng.normal(0.0, NOISE))))
        nbytes = max(0, round(option.nbytes * factor))
        found.append(replace(option, nbytes=nbytes, ms=option.ms * factor))
    return found


class KnapsackSampler(BaseSampler):
    """``base``, except that a ``share`` of the trials it is asked for are knapsack plans
    (``knapsack.propose``) instead; each trial's draw is seeded by the study's seed and its number,
    so a resumed study decides as the first run would have."""

    def __init__(
        self,
        base: BaseSampler,
        knapsack: Knapsack,
        share: float,
        seed: int | None = None,
    ) -> None:
        self.base = base
        self.knapsack = knapsack
        self.share = share
        self.seed = seed
        self._proposals: dict[int, dict[str, Any] | None] = {}

    def proposal(self, number: int) -> dict[str, Any] | None:
        """The params proposed for trial ``number`` (None: the base sampler's trial)."""
        return self._proposals.get(number)

    def _decide(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any] | None:
        if trial.number not in self._proposals:
            rng = np.random.default_rng([self.seed or 0, trial.number])
            proposal = None
            if rng.random() < self.share:
                proposal = self.knapsack.propose(study.get_trials(deepcopy=False), rng)
            self._proposals[trial.number] = proposal
        return self._proposals[trial.number]

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if self._decide(study, trial) is not None:
            return dict(self.knapsack.space.distributions)
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        proposal = self._decide(study, trial)
        if proposal is not None:
            return dict(proposal)
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


class Knapsack:
    """Knapsack plans over ``space`` from ``table``: at given levels (the queued ones), or
    proposed at levels the measured trials calibrate. Each layer's options are priced once."""

    def __init__(
        self,
        space: SearchSpace,
        table: SensitivityTable,
        model: nn.Module,
        *,
        min_metric: float | None,
        max_drop: float | None,
        prices_time: bool,
    ) -> None:
        self.space = space
        self.table = table
        self.model = model
        self.min_metric = min_metric
        self.max_drop = max_drop
        self.prices_time = prices_time and bool(table.model_ms)
        self._options: dict[str, list[Option]] | None = None
        self._tried: dict[int, tuple[float, bool] | None] = {}  # finished trials never change

    @property
    def options(self) -> dict[str, list[Option]]:
        if self._options is None:  # each layer quantized at each bit-width: once
            self._options = group_options(self.space, self.table, self.model)
        return self._options

    def plans(self, levels: list[float], speed: float) -> list[Candidate]:
        """``candidate_plans`` at ``levels``, the weight of time ``speed``."""
        return candidate_plans(self.space, self.table, self.model, levels, speed, self.options)

    def tried(self, trials: list[FrozenTrial]) -> list[tuple[float, bool]]:
        """(predicted distortion, met the metric budget) of each measured trial whose plan
        the additive model prices."""
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.number not in self._tried:
                self._tried[t.number] = self._judged(t)
        return [found for found in self._tried.values() if found is not None]

    def _judged(self, trial: FrozenTrial) -> tuple[float, bool] | None:
        metric, text = trial.user_attrs.get("metric"), trial.user_attrs.get("plan")
        if text is None or not isinstance(metric, (int, float)) or not math.isfinite(metric):
            return None
        try:
            plan = Plan.from_json(text)
            if plan.base:  # a student's: the table (the original's) does not price it
                return None
            predicted = self.table.predicted_distortion(self.space, plan)
        except (ValueError, TypeError, KeyError):
            return None
        if predicted is None:
            return None
        met = trial.state == TrialState.COMPLETE and (
            self.min_metric is None or metric >= self.min_metric
        )
        return predicted, met

    def level(self, tried: list[tuple[float, bool]], rng: np.random.Generator) -> float | None:
        """A distortion level at which a plan meets the metric budget with a chance drawn
        from ``CHANCES``, by a logistic fit of met/missed against the log of the predicted
        distortion over the measured trials (the additive model recalibrated). Until the
        trials show both outcomes around a slope, from ``BELOW`` times below the largest
        predicted distortion that met the budget up to it; before any, the probes'
        estimate of the budget."""
        fit = _chance_fit(tried)
        if fit is not None:
            a, b = fit
            chance = rng.uniform(*CHANCES)
            return float(math.exp((math.log(chance / (1 - chance)) - a) / b))
        met = [d for d, ok in tried if ok and d > 0]
        missed = [d for d, ok in tried if not ok and d > 0]
        if met:
            high = max(met)
        elif missed:
            high = min(missed) / 8.0
        else:
            guess = budget_level(self.table, self.max_drop) if self.max_drop else None
            if guess is None:
                return None
            high = guess
        return float(math.exp(rng.uniform(math.log(high / BELOW), math.log(high))))

    def propose(self, trials: list[FrozenTrial], rng: np.random.Generator) -> dict[str, Any] | None:
        """The params of a knapsack plan at a calibrated level, on perturbed costs (None if
        there is none). With ``model.candidates``, its base is drawn evenly among the
        original and the students: the original's plan on a student's layers of the same
        names (the level is fitted on the original's trials alone)."""
        level = self.level(self.tried(trials), rng)
        if level is None or not self.options:
            return None
        if rng.random() < BELOW_BUDGET:
            level /= float(np.exp(rng.uniform(0.0, math.log(SPAN))))
        speed = 0.0  # bytes alone, unless the study prices time: then half size-first
        if self.prices_time:
            speed = (
                SIZE_FIRST if rng.random() < 0.5 else float(rng.uniform(SIZE_FIRST, SPEED_FIRST))
            )
        perturbed = {group: _perturbed_all(opts, rng) for group, opts in self.options.items()}
        found = candidate_plans(self.space, self.table, self.model, [level], speed, perturbed)
        params = self.space.params_for(found[0].plan) if found else None
        if params is not None and self.space.students:  # the plan, on a base drawn evenly
            bases = [ORIGINAL, *self.space.students]
            params[BASE] = bases[int(rng.integers(len(bases)))]
        return params
