"""Several drivers on one study: the trials they share a budget of, the trials a driver
that is gone left running (failed and queued again), and the heartbeat that tells the
others a driver is alive."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from autosqueeze.studies.study import (
    BASELINE,
    FAIL_REASON,
    PREDICTED_DISTORTION,
    PREDICTED_LATENCY,
    REQUEUED,
)

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


def fail_trial(
    study: optuna.Study, trial: optuna.Trial | int, reason: str, *, requeue: bool = False
) -> None:
    """Mark a running trial FAILED with its reason; ``requeue`` asks for its params again.

    ``trial``: the ``optuna.Trial`` this driver asked for (Optuna's public API), or the
    number of one another driver left running. Optuna has no public way to annotate a trial
    this process did not ask for, so that case goes through its storage: the reason stays on
    the trial, where optuna-dashboard and every reader look for it."""
    attrs = {FAIL_REASON: reason, **({REQUEUED: True} if requeue else {})}
    if isinstance(trial, optuna.Trial):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        number, params, user_attrs = trial.number, trial.params, trial.user_attrs
    else:
        frozen = study.get_trials(deepcopy=False)[trial]
        storage = study._storage  # Optuna has no public setter for a finished trial
        for key, value in attrs.items():
            storage.set_trial_user_attr(frozen._trial_id, key, value)
        number, params, user_attrs = frozen.number, frozen.params, frozen.user_attrs
    study.tell(number, state=TrialState.FAIL)
    if requeue and params:
        kept = (BASELINE, PREDICTED_DISTORTION, PREDICTED_LATENCY)
        attrs = {k: v for k, v in user_attrs.items() if k in kept}
        study.enqueue_trial(params, user_attrs={**attrs, "retry_of": number})


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


def finished_last(study: optuna.Study, trials: list[FrozenTrial]) -> bool:
    """Whether this driver is the one to act now that ``trials`` have all finished: the one
    that finished the last of them (or any, once that one is gone). Every driver sees the
    same finished trials, so exactly one acts; several acting at once would each see room
    for the same queued plans and queue more than the budget between them."""
    last = max(trials, key=lambda t: (t.datetime_complete or datetime.min, t.number))
    driver = last.user_attrs.get(DRIVER)
    return driver in (None, DRIVER_ID) or not _driver_alive(study, driver)


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
            except Exception:  # noqa: BLE001 - a storage hiccup must not kill the search; next beat retries
                continue
