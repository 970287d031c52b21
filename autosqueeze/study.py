"""The Optuna study behind a config: storage, directions, sampler, baselines, resume.

Measurements and plans live on each trial as user attributes, the budgets as Optuna
constraints, and the uncompressed model's measurements (the reference for metric drop and
compression ratios) on the study, so that every reader needs only the storage.

Latency is stored as each trial's side-by-side ``speedup`` over the original model; the
original's absolute latency is the robust median of every side-by-side timing of it
(``robust_latency``), and each trial's ``latency_ms`` is derived from the two when read.
The Optuna objective is the relative latency (1 / speedup), which no later timing changes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.trial import FrozenTrial, TrialState

from autosqueeze.config import StudyConfig, masked
from autosqueeze.errors import UserError
from autosqueeze.journal import JournalReader, JournalWriter, check_is_journal, skipped_warning
from autosqueeze.measure import Measurements, robust_latency
from autosqueeze.objectives import OBJECTIVES
from autosqueeze.plan import Plan
from autosqueeze.samplers import create_sampler

REFERENCE = "reference"  # study attr: measurements of the uncompressed model
SENSITIVITY = "sensitivity"  # study attr: the sensitivity table (autosqueeze.sensitivity)
PREDICTED_DISTORTION = "predicted_distortion"  # trial attr: a knapsack plan's level
PREDICTED_LATENCY = "predicted_latency"  # trial attr: its latency model's, vs the original's
REFINED = "refined"  # study attr: refining knapsack plans queued so far (sensitivity.refine)
BASELINES_QUEUED = "baselines_queued"  # study attr: the trial budget the baselines were queued for
BASELINE = "baseline"  # trial attr: "original" / "int8" for the enqueued baselines
PLAN = "plan"  # trial attr: the plan as JSON
FAIL_REASON = "fail_reason"
STOPPED = "stopped"  # trial attr: why a PRUNED trial stopped before it was timed
REQUEUED = "requeued"  # trial attr: failed by an interruption, its params queued again


def open_storage(config: StudyConfig, *, writable: bool = True) -> optuna.storages.BaseStorage:
    """A database URL (``sqlite:///``, ``postgresql://``) or a journal file path.

    The default is Optuna's journal file in the study folder: at 300 trials it costs the
    driver ~18 ms per trial against ~110 ms for SQLite (``benchmarks/scaling.py``). A
    command that only reads (``writable=False``) creates nothing, repairs nothing and never
    opens the file for writing: another user's study, or a file given by mistake, is left
    exactly as it was.
    """
    target = config.storage
    try:
        if "://" in target:
            if target.startswith("sqlite:///"):
                database = Path(target[len("sqlite:///") :])
                if not writable and not database.is_file():
                    raise UserError(_missing(config, database))
                database.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.get_storage(target)
        path = Path(target)
        check_is_journal(path)
        if not writable and not path.is_file():
            raise UserError(_missing(config, path))
        if writable:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend: JournalReader | JournalWriter = JournalWriter(str(path))
            backend.drop_torn_tail()
        else:
            backend = JournalReader(str(path))
        storage = JournalStorage(backend)
        _warn_once(skipped_warning(path, backend.skipped))
        return storage
    except UserError:
        raise
    except ImportError:
        raise UserError(
            f"search.storage: {masked(target)!r} needs a database driver that is not installed; "
            "for PostgreSQL: pip install 'autosqueeze[postgres]'."
        ) from None
    except Exception as exc:
        raise UserError(
            f"search.storage: cannot open {masked(target)!r}: {type(exc).__name__}: "
            f"{masked(str(exc))}"
        ) from None


_warned: set[str] = set()


def _warn_once(warning: str | None) -> None:
    """A skipped journal line is told once per process, not at every dashboard poll."""
    if warning and warning not in _warned:
        _warned.add(warning)
        print(f"autosqueeze: warning: {warning}", file=sys.stderr)


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")  # what Optuna's RDB storage supports


def check_storage(config: StudyConfig) -> None:
    """What ``validate`` can say about the storage without connecting or writing: a URL's
    database is known, a journal path is a journal file or not there yet."""
    target = config.storage
    if "://" in target:
        scheme = target.split("://", 1)[0].split("+", 1)[0]
        if scheme not in STORAGE_SCHEMES:
            raise UserError(
                f"search.storage: {scheme!r} is not a database Optuna can use "
                f"({', '.join(STORAGE_SCHEMES)}), nor a journal file path"
            )
        try:
            from sqlalchemy.engine import make_url

            make_url(target).get_dialect()
        except Exception as exc:
            raise UserError(
                f"search.storage: {masked(target)!r} is not a usable database URL: "
                f"{type(exc).__name__}: {masked(str(exc))[:200]}"
            ) from None
        return
    path = Path(target)
    check_is_journal(path)


def _missing(config: StudyConfig, path: Path) -> str:
    return (
        f"no study named {config.name!r}: {path} does not exist; run 'autosqueeze search' "
        "first (or check --study-dir / --storage)."
    )


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


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as autosqueeze reads it back from the storage."""

    number: int
    state: str
    measurements: Measurements | None  # complete trials; pruned ones without latency/memory
    feasible: bool
    baseline: str | None
    plan: Plan | None
    fail_reason: str | None
    constraints: dict[str, float]

    @classmethod
    def of(cls, trial: FrozenTrial, reference_ms: float | None = None) -> TrialRecord:
        """``reference_ms``: the study's robust latency of the original, from which this
        trial's absolute latency is derived (its speedup is what was measured)."""
        attrs = trial.user_attrs
        measured = all(k in attrs for k in ("metric", "size_bytes"))
        finished = trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        got = _measurements(attrs) if measured and finished else None
        if got is not None and reference_ms is not None:
            got = got.at_reference(reference_ms)
        constraints = dict(trial.constraints)
        return cls(
            number=trial.number,
            state=trial.state.name,
            measurements=got,
            feasible=trial.state == TrialState.COMPLETE
            and all(v <= 0 for v in constraints.values()),
            baseline=attrs.get(BASELINE),
            plan=Plan.from_json(attrs[PLAN]) if PLAN in attrs else None,
            fail_reason=attrs.get(FAIL_REASON) or attrs.get(STOPPED),
            constraints=constraints,
        )


_MEASURED = [f for f in Measurements.__dataclass_fields__ if f != "seconds"]


def _measurements(attrs: dict[str, Any]) -> Measurements:
    return Measurements(**{k: attrs.get(k) for k in _MEASURED})


def records(study: optuna.Study) -> list[TrialRecord]:
    trials = study.get_trials(deepcopy=False)
    ref = reference(study, trials)
    ref_ms = ref.latency_ms if ref else None
    return [TrialRecord.of(t, ref_ms) for t in trials]


def reference(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> Measurements | None:
    """The uncompressed model's measurements, its latency the robust median of every timing
    of it beside a trial (``trials``: the study's, read again when not given)."""
    ref = study.user_attrs.get(REFERENCE)
    if not ref:
        return None
    original = _measurements(ref)
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    samples = reference_timings(original, trials)
    return replace(original, latency_ms=robust_latency(samples) or original.latency_ms)


def reference_timings(original: Measurements, trials: list[FrozenTrial]) -> list[float]:
    """Every side-by-side timing of the original model: the reference evaluation's and each
    complete trial's."""
    first = original.reference_latency_ms or original.latency_ms
    return ([first] if first else []) + [
        t.user_attrs["reference_latency_ms"]
        for t in trials
        if t.state == TrialState.COMPLETE and t.user_attrs.get("reference_latency_ms")
    ]


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


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards ``search.trials``: complete, pruned or failed, not requeued."""
    return _count(study, FINISHED)


def taken_count(study: optuna.Study, *, waiting: bool = False) -> int:
    """Finished trials plus those running now, by this driver or any other (and, with
    ``waiting``, those queued and not yet asked for)."""
    extra = (TrialState.WAITING,) if waiting else ()
    return _count(study, (*FINISHED, TrialState.RUNNING, *extra))


def _count(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    trials = study.get_trials(deepcopy=False, states=states)
    return sum(1 for t in trials if not t.user_attrs.get(REQUEUED))


def fail_trial(study: optuna.Study, number: int, reason: str, *, requeue: bool = False) -> None:
    """Mark a running trial FAILED with its reason; ``requeue`` asks for its params again."""
    trial = study.get_trials(deepcopy=False)[number]
    storage = study._storage  # noqa: SLF001 - Optuna exposes no public per-trial attr setter
    storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)  # noqa: SLF001
    if requeue:
        storage.set_trial_user_attr(trial._trial_id, REQUEUED, True)  # noqa: SLF001
    study.tell(number, state=TrialState.FAIL)
    if requeue and trial.params:
        kept = (BASELINE, PREDICTED_DISTORTION, PREDICTED_LATENCY)
        attrs = {k: v for k, v in trial.user_attrs.items() if k in kept}
        study.enqueue_trial(trial.params, user_attrs={**attrs, "retry_of": number})


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a driver that is gone: failed, and queued to be run again.

    Several drivers may share a study; a RUNNING trial of a live one is left alone. A driver
    is gone when its process no longer exists (same host) or its heartbeat is stale.
    """
    stale = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not _driver_alive(study, t.user_attrs.get(DRIVER))
    ]
    for number in stale:
        fail_trial(study, number, "interrupted: the run evaluating it stopped", requeue=True)
    return stale


DRIVER = "driver"  # trial attr: which driver process asked for the trial
DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
HEARTBEAT_S = 20.0
HEARTBEAT_STALE_S = 6 * HEARTBEAT_S


def _driver_alive(study: optuna.Study, driver: str | None) -> bool:
    """A fresh heartbeat, and on this host a process that still exists."""
    if driver is None or driver == DRIVER_ID:
        return False  # unknown, or asked by this very process before it (re)started
    beat = study.user_attrs.get(f"heartbeat:{driver}", 0.0)
    if time.time() - beat > HEARTBEAT_STALE_S:
        return False
    host, pid, _ = driver.split(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return True


class Heartbeat:
    """While a driver runs, a thread stamps the study so other drivers know it is alive."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name="autosqueeze-heartbeat", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._study.set_user_attr(f"heartbeat:{DRIVER_ID}", time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._study.set_user_attr(f"heartbeat:{DRIVER_ID}", time.time())
            except Exception:  # a storage hiccup must not kill the search; next beat retries
                continue
