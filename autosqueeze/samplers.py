"""Optuna samplers by name: ``create_sampler("tpe", seed=0)``.

The default is TPE (multivariate, with constant liar for parallel asks); the measurements
behind that choice are in ``benchmarks/samplers.py`` and ``docs/architecture.md``. It models
after 10 finished trials, not Optuna's 20 random ones: a study starts with 10-20 queued
plans (baselines, knapsack plans, warm starts), and random plans in 50-100 per-layer
dimensions almost all break the model.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from autosqueeze.errors import UserError

SamplerFactory = Callable[[int | None], optuna.samplers.BaseSampler]


def _tpe(seed: int | None) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10
    )


SAMPLERS: dict[str, SamplerFactory] = {
    "tpe": _tpe,
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=20),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def create_sampler(name: str, *, seed: int | None) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise UserError(f"search.sampler: {name!r} is not one of {', '.join(SAMPLERS)}.")
    return SAMPLERS[name](seed)
