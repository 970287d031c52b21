"""The Optuna study behind a config: its attributes, directions, sampler and constraints.

Measurements and plans live on each trial as user attributes, the budgets as Optuna
constraints, and the uncompressed model's measurements (the reference for metric drop and
compression ratios) on the study, so that every reader needs only the storage
(``autosqueeze.studies.storage``). Reading trials back is ``autosqueeze.studies.records``; several
drivers on one study, ``autosqueeze.studies.drivers``. The Optuna objective for latency is the
relative latency (1 / speedup), which no later timing changes.
"""

from __future__ import annotations

import warnings

import optuna

from autosqueeze.common.errors import UserError
from autosqueeze.measuring.measure import Measurements
from autosqueeze.settings.config import StudyConfig
from autosqueeze.settings.objectives import OBJECTIVES
from autosqueeze.studies.samplers import create_sampler
from autosqueeze.studies.storage import open_storage

REFERENCE = "reference"  # study attr: measurements of the uncompressed model
ONE_CALL = "one_call"  # study attr: ONNX Runtime's one-call quantizers' measurements, by name
RUNTIME = "runtime"  # study attr: the runtime its trials were measured in (budgets.runtime)
SENSITIVITY = "sensitivity"  # study attr: the sensitivity table (autosqueeze.searching.sensitivity)
PREDICTED_DISTORTION = "predicted_distortion"  # trial attr: a knapsack plan's level
PREDICTED_LATENCY = "predicted_latency"  # trial attr: its latency model's, vs the original's
REFINED = "refined"  # study attr: refining knapsack plans queued so far (sensitivity.refine)
BASELINES_QUEUED = "baselines_queued"  # study attr: the trial budget the baselines were queued for
BASELINE = "baseline"  # trial attr: "original" / "int8" for the enqueued baselines
PLAN = "plan"  # trial attr: the plan as JSON
FAIL_REASON = "fail_reason"
STOPPED = "stopped"  # trial attr: why a PRUNED trial stopped before it was timed
REQUEUED = "requeued"  # trial attr: failed by an interruption, its params queued again


def sampler_of(config: StudyConfig) -> optuna.samplers.BaseSampler:
    search = config.search
    return create_sampler(
        search.sampler, seed=search.seed, options=search.sampler_options, search_dir=config.folder
    )


def open_study(config: StudyConfig, *, create: bool) -> optuna.Study:
    """The config's study; ``create=False`` for readers, which create and write nothing."""
    storage = open_storage(config, writable=create)
    directions = [OBJECTIVES[o].direction for o in config.objectives]
    if not create:
        try:
            return optuna.load_study(study_name=config.name, storage=storage)
        except KeyError:
            raise UserError(
                f"no study named {config.name!r} in {config.storage_shown}; "
                "run 'autosqueeze search' first (or check --study-dir / --storage)."
            ) from None
    study = optuna.create_study(
        study_name=config.name,
        storage=storage,
        directions=directions,
        sampler=sampler_of(config),
        load_if_exists=True,
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != directions:
        raise UserError(
            f"objectives: the study {config.name!r} in {config.storage_shown} was created with "
            f"objectives of directions {existing}, the config asks for {config.objectives}; "
            "use another name or --study-dir for a different set of objectives."
        )
    study.set_user_attr("objectives", list(config.objectives))
    names = [OBJECTIVES[o].optuna_name or config.metric_name for o in config.objectives]
    if study.metric_names != names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)  # what optuna-dashboard labels the axes
    return study


def constraints(config: StudyConfig, ref: Measurements, got: Measurements) -> dict[str, float]:
    """Budget slack per budget; <= 0 is within budget (Optuna's convention). A trial that
    stopped early has no latency or memory, and no slack for them."""
    out = {}
    for objective in OBJECTIVES.values():
        slack = objective.slack(config.budgets, ref, got)
        if slack is not None:
            out[objective.constraint] = slack
    return out


def objective_values(config: StudyConfig, got: Measurements) -> list[float]:
    """What Optuna optimizes, per objective (``Objective.study_value``)."""
    return [float(OBJECTIVES[o].study_value(got)) for o in config.objectives]
