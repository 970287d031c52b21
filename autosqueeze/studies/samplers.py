"""Optuna samplers by name, or the user's: ``create_sampler("tpe", seed=0)``.

``search.sampler`` is a built-in name or a ``"module:callable"`` called with ``seed=`` and
the ``search.sampler_options`` as keywords; built-ins take the options as keywords too
(``{n_startup_trials: 20}`` for TPE). Budgets reach any sampler the Optuna way: each trial's
constraints are set on it (``trial.set_constraint``), which Optuna's samplers read.

The default is TPE (multivariate, with constant liar for parallel asks); the measurements
behind that choice are in ``benchmarks/samplers.py`` and ``docs/architecture.md``. It models
after 10 finished trials, not Optuna's 20 random ones: a study starts with 10-20 queued
plans (baselines, knapsack plans, warm starts), and random plans in 50-100 per-layer
dimensions almost all break the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from autosqueeze.common.errors import UserError
from autosqueeze.usercode.user_code import call_user, describe, load_callable

SamplerFactory = Callable[..., optuna.samplers.BaseSampler]


def _tpe(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    defaults = {"multivariate": True, "constant_liar": True, "n_startup_trials": 10}
    return optuna.samplers.TPESampler(seed=seed, **{**defaults, **options})


def _nsga2(seed: int | None, **options: Any) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, **{"population_size": 20, **options})


SAMPLERS: dict[str, SamplerFactory] = {
    "tpe": _tpe,
    "nsga2": _nsga2,
    "gp": lambda seed, **options: optuna.samplers.GPSampler(seed=seed, **options),
    "random": lambda seed, **options: optuna.samplers.RandomSampler(seed=seed, **options),
}


def create_sampler(
    name: str,
    *,
    seed: int | None,
    options: dict[str, Any] | None = None,
    search_dir: Path | None = None,
) -> optuna.samplers.BaseSampler:
    """The sampler ``search.sampler`` names, built with ``search.sampler_options``."""
    options = dict(options or {})
    if ":" in name:
        factory = load_callable(name, field="search.sampler", search_dir=search_dir)
        sampler = call_user(lambda: factory(seed=seed, **options), field="search.sampler", ref=name)
    elif name in SAMPLERS:
        try:
            sampler = SAMPLERS[name](seed, **options)
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"search.sampler_options: {name} does not take {options}: {describe(exc)}"
            ) from None
    else:
        raise UserError(
            f"search.sampler: {name!r} is not one of {', '.join(SAMPLERS)} nor a 'module:callable'."
        )
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise UserError(
            f"search.sampler: {name!r} returned {type(sampler).__name__}, not an Optuna sampler."
        )
    return sampler
