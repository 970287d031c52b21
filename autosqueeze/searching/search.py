"""The search loop: ask the study for plans, evaluate them, tell the results back.

The driver is the only writer of the study; executors only compute. The loop runs until the
study holds ``search.trials`` finished trials (so re-running resumes rather than repeats),
the timeout passes, or the user presses Ctrl-C (running trials are failed and re-queued).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from autosqueeze.artifacts.onnx_forms import ONE_CALL as ONE_CALL_QUANTIZERS
from autosqueeze.common.errors import Terminated, UserError
from autosqueeze.common.progress import progress_bar
from autosqueeze.compression.techniques import TECHNIQUES
from autosqueeze.measuring.device_lock import DeviceLock
from autosqueeze.measuring.measure import Limits, Measurements, robust_latency
from autosqueeze.measuring.timing_cache import Timings, user_cached
from autosqueeze.problem.task import Task, load_task
from autosqueeze.results.front import Front, compute_front, write_front
from autosqueeze.searching.budgets import check_reachable
from autosqueeze.searching.executors import Executor, Outcome, create_executor, evaluate_now
from autosqueeze.searching.proposals import PROPOSED, Knapsack, KnapsackSampler
from autosqueeze.searching.sensitivity import (
    CHAIN_STOP,
    SIZE_FIRST,
    SPEED_FIRST,
    Candidate,
    SensitivityTable,
    budget_level,
    grid,
    ladder,
    measure_sensitivity,
    refined_levels,
    shaped_space,
)
from autosqueeze.searchspace.space import BASE, SearchSpace, build_space, study_space
from autosqueeze.settings.config import StudyConfig
from autosqueeze.studies.drivers import (
    DRIVER,
    DRIVER_ID,
    FINISHED,
    Heartbeat,
    fail_trial,
    finished_count,
    finished_last,
    recover_interrupted,
    taken_count,
)
from autosqueeze.studies.records import records, reference, reference_timings
from autosqueeze.studies.study import (
    BASELINE,
    BASELINES_QUEUED,
    ONE_CALL,
    PLAN,
    PREDICTED_DISTORTION,
    PREDICTED_LATENCY,
    REFERENCE,
    REFINED,
    RUNTIME,
    SENSITIVITY,
    constraints,
    objective_values,
    open_study,
)
from autosqueeze.usercode.user_code import check_imports


@dataclass
class SearchResult:
    study: optuna.Study
    task: Task
    space: SearchSpace
    front: Front
    ran: int  # trials finished by this call
    interrupted: bool
    notes: list[str]
    front_csv: Path | None = None  # written unless interrupted or empty
    sensitivity: SensitivityTable | None = None
    searched: SearchSpace | None = None  # the space the sampler searched (shaped by the table)
    terminated: bool = False  # interrupted by SIGTERM rather than Ctrl-C


def run_search(
    config: StudyConfig, *, progress: bool = True, task: Task | None = None, check: bool = True
) -> SearchResult:
    """Run ``config``'s search, or resume it, and write its front: ``autosqueeze search``.

    With ``check`` (as the command does), a config that cannot give a front is refused
    before the study is created: a module that ends the process while imported (tried in a
    child Python; not where ``task`` is given, its modules imported already), or budgets that
    the space's most compressed plan misses (``budgets.check_reachable``).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if check and task is None:
        check_imports(config)  # a module that exits while imported must not pass for a search
    task = task or load_task(config)
    if check:
        check_reachable(config, task, study_space(task))
    study = open_study(config, create=True)
    task = pin_runtime(study, task)
    space = study_space(task)
    notes: list[str] = knob_warnings(space, task)
    stale = recover_interrupted(study)
    if stale:
        notes.append(f"re-queued {len(stale)} trial(s) left running by an earlier run: {stale}")
    notes += _distil_students(task, progress)  # before the executor: they travel with the task
    executor = create_executor(config, task)
    front_csv = table = knapsack = None
    searched = space
    handlers = _current_handlers()
    try:
        with Heartbeat(study):
            ref = _reference(study, executor, space)
            notes += _measure_one_call(study, config, task)
            if config.sensitivity.enabled:
                table = sensitivity_table(
                    study, config, space, executor, task=task, progress=progress
                )
                searched, shaping_notes = _shaped(config, space, table, task)
                notes += shaping_notes
                knapsack = Knapsack(
                    searched,
                    table,
                    task.model,
                    min_metric=Limits.of(config.budgets, ref.metric).min_metric,
                    max_drop=config.budgets.max_metric_drop,
                    prices_time=prices_time(config),
                )
                if config.sensitivity.knapsack_share > 0:
                    study.sampler = KnapsackSampler(
                        study.sampler,
                        knapsack,
                        config.sensitivity.knapsack_share,
                        config.search.seed,
                    )
            notes += _enqueue_baselines(study, searched, config, knapsack)
            refine = functools.partial(_refine, study, config, searched, knapsack)
            ran, stop = _loop(study, config, searched, executor, ref, progress, refine)
        front = compute_front(study, config.objectives)
        if front.members and stop is None:  # rebuilt on the evaluators, in parallel
            plans = {m.number: m.plan for m in front.members if m.plan is not None}
            front_csv = write_front(
                front, config.output_dir, executor.artifacts(plans), _shipped_as(task)
            )
    except KeyboardInterrupt:  # in the pass or the reference: wind down as the loop does
        _exit_on_another_signal()
        raise
    finally:
        executor.close()
        _restore_handlers(handlers)
    return SearchResult(
        study,
        task,
        space,
        front,
        ran,
        stop is not None,
        notes,
        front_csv,
        table,
        searched,
        terminated=stop == signal.SIGTERM,
    )


@dataclass(frozen=True)
class SensitivityResult:
    table: SensitivityTable
    space: SearchSpace  # the original model's, whose layers the table covers
    task: Task  # in the study's runtime


def run_sensitivity(config: StudyConfig, *, progress: bool = True) -> SensitivityResult:
    """Measure the sensitivity probes the study lacks (all of them the first time; none once
    a run finished the pass) and store them in the study, creating it where it is new, so
    the search that follows reuses them: ``autosqueeze sensitivity``'s procedure."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, create=True)
    task = pin_runtime(study, load_task(config))
    space = build_space(task.model, config.space, task.target)
    executor = create_executor(config, task)
    try:
        table = sensitivity_table(study, config, space, executor, task=task, progress=progress)
    finally:
        executor.close()
    return SensitivityResult(table, space, task)


def pin_runtime(study: optuna.Study, task: Task) -> Task:
    """``in_study_runtime``, recorded on the study where it has no runtime yet: what a
    command that measures into the study calls first."""
    task = in_study_runtime(study, task)
    if RUNTIME not in study.user_attrs:
        study.set_user_attr(RUNTIME, task.runtime)
    return task


def in_study_runtime(study: optuna.Study, task: Task) -> Task:
    """``task`` measuring in the runtime ``study``'s trials were measured in (read, never
    written: readers call it too): a study resumed under ``runtime: auto`` keeps its
    runtime; a runtime set otherwise in the config is the user's error, named."""
    recorded = recorded_runtime(study)
    if recorded is None or recorded == task.runtime:
        return task
    if task.config.budgets.runtime != "auto" or recorded not in ("torch", "onnxruntime"):
        raise UserError(
            f"budgets.runtime: {task.config.budgets.runtime}, but the study "
            f"{task.config.name!r} was measured in {recorded}; set runtime: {recorded} (or "
            "auto) to resume it, or give it another study_dir"
        )
    why = f"auto: the study was measured in {recorded} (kept on resume)"
    return replace(task, runtime=recorded, runtime_reason=why)


def recorded_runtime(study: optuna.Study) -> str | None:
    """The runtime ``study``'s trials were measured in, recorded when it started (one made
    before the record was kept: ONNX Runtime where it holds the one-call baselines, else
    torch); None for a study that has measured nothing."""
    if RUNTIME in study.user_attrs:
        return str(study.user_attrs[RUNTIME])
    if reference(study) is None:
        return None
    return "onnxruntime" if ONE_CALL in study.user_attrs else "torch"


def _distil_students(task: Task, progress: bool) -> list[str]:
    """``model.candidates`` distilled from the original (or loaded from the cache)."""
    if not task.candidates:
        return []
    notes: list[str] = []
    steps = task.config.model.distill_steps
    with progress_bar(
        total=len(task.candidates), unit="student", desc="distil", enabled=progress
    ) as bar:

        def done(name: str, cached: bool) -> None:
            how = "from the cache" if cached else f"distilled ({steps} steps at most)"
            notes.append(f"student {name!r}: {how}")
            bar.update()

        task.distil_students(done)
    return notes


def knob_warnings(space: SearchSpace, task: Task) -> list[str]:
    """Knobs the space offers that cannot work as configured: structural ones (channel
    pruning, factorization) without ``task.calibration`` get no recovery training, and on
    the residual CNN that left them at 0.49-0.70 accuracy against 0.99; calibrated ones
    (``Technique.calibrated``: smoothing) judge the inputs by the example input alone, and
    on MiniLM smoothing from one sentence lost fidelity where 8 batches gained it."""
    if task.calibration:
        return []
    offered = {knob for layer in space.layers.values() for knob in layer.searched}
    structural = sorted(k for k in offered if TECHNIQUES[k].structural)
    calibrated = sorted(k for k in offered if TECHNIQUES[k].calibrated)
    found = []
    if structural:
        found.append(
            f"the space offers {' and '.join(structural)} but task.calibration is not set: "
            "without calibration batches there is no recovery training after them, so most of "
            "their values break the model (the sensitivity pass then leaves those out). Add "
            "task.calibration: 'module:callable' returning unlabeled input batches."
        )
    if calibrated:
        found.append(
            f"the space offers {' and '.join(calibrated)} but task.calibration is not set: "
            "its input statistics then come from the example input alone, too few inputs to "
            "judge them by. Add task.calibration: 'module:callable' returning unlabeled input "
            "batches."
        )
    return found


def sensitivity_table(
    study: optuna.Study,
    config: StudyConfig,
    space: SearchSpace,
    executor: Executor,
    *,
    task: Task | None = None,
    progress: bool = True,
) -> SensitivityTable:
    """The study's sensitivity table, measuring the probes it lacks on the executor (all of
    them the first time; none when a run before finished the pass). With the ``task``, and
    ``sensitivity.timing_cache`` on, layer timings come from the user's cache where it has
    them (``autosqueeze.measuring.timing_cache``)."""
    stored = study.user_attrs.get(SENSITIVITY)
    table = SensitivityTable.from_dict(stored, config.sensitivity.samples)
    bar = progress_bar(unit="probe", desc="sensitivity", enabled=progress)

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        return measure_sensitivity(
            space,
            executor.probes,
            table,
            lambda t: study.set_user_attr(SENSITIVITY, t.to_dict()),
            timings=_timings(config, executor, task) if prices_time(config) else None,
            stop_drop=_stop_drop(config),
            progress=advance,
            by_layer=executor.layer_probes,
            by=pass_by(config, task),
            checks=config.sensitivity.checks,
        )
    finally:
        bar.close()


def pass_by(config: StudyConfig, task: Task | None) -> tuple[str, str]:
    """Which sensitivity pass (``sensitivity.by``), and why: by whole model where probes are
    forward passes of a small model, by layer past ``sensitivity.by_layer_above`` parameters
    (decided by size, not by a timing, so that a seeded study repeats itself)."""
    chosen = config.sensitivity.by
    if chosen != "auto":
        return chosen, f"sensitivity.by: {chosen}"
    if task is None:
        return "model", "sensitivity.by: auto, and no model at hand to count"
    count = sum(p.numel() for p in task.model.parameters())
    limit = config.sensitivity.by_layer_above
    if count > limit:
        return "layer", f"{count:,} parameters, past sensitivity.by_layer_above ({limit:,})"
    return "model", f"{count:,} parameters, within sensitivity.by_layer_above ({limit:,})"


def _stop_drop(config: StudyConfig) -> float | None:
    """Where a layer's probes of stronger values stop (``measure_sensitivity``): well past
    the drop at which the shaped space leaves a value out; never without a metric budget."""
    drop = config.budgets.max_metric_drop
    return None if drop is None else CHAIN_STOP * config.sensitivity.margin * drop


def _timings(config: StudyConfig, executor: Executor, task: Task | None) -> Timings:
    if task is None or not config.sensitivity.timing_cache:
        return executor.timings
    return user_cached(executor.timings, task, config.measure.threads)


def prices_time(config: StudyConfig) -> bool:
    """Whether the study cares about latency (an objective or a budget): only then does the
    pass time layers and the knapsack weigh time. Otherwise the plans queued depend on
    nothing measured in time, and a seeded study repeats itself."""
    return "latency_ms" in config.objectives or config.budgets.max_latency_ms is not None


def _size_first(config: StudyConfig) -> float:
    return SIZE_FIRST if prices_time(config) else 0.0


def _shaped(
    config: StudyConfig, space: SearchSpace, table: SensitivityTable, task: Task
) -> tuple[SearchSpace, list[str]]:
    """The space the sampler searches: without values the table shows to break the model."""
    if table.base is None:
        reason = table.failed.get("(base)", "no result")
        raise UserError(f"sensitivity: the model cannot be judged on its first samples: {reason}")
    notes = []
    if table.failed:
        first = next(iter(table.failed.items()))
        notes.append(
            f"sensitivity: {len(table.failed)} probe(s) failed, e.g. {first[0]}: {first[1]}"
        )
    drop = config.budgets.max_metric_drop
    if drop is None:
        return space, notes + ["sensitivity: no budgets.max_metric_drop, so the space is whole"]
    margin = config.sensitivity.margin
    level = budget_level(table, drop)
    cap = level * margin if level is not None else None
    keep = BASELINE_VALUES | (RECOVERED_VALUES if task.calibration else set())
    shaped = shaped_space(space, table, drop, margin, keep=keep, max_distortion=cap)
    before, after = _size(space), _size(shaped)
    within = f"{margin:g} x max_metric_drop" + (
        f" and distortion {cap:.2g}" if cap is not None else ""
    )
    notes.append(
        f"sensitivity: {len(table.drops)} probes in {table.seconds:.0f} s; the space keeps "
        f"{after:,} of {before:,} values (those alone within {within})"
    )
    if table.by == "layer":
        notes.append(
            f"sensitivity: by layer ({table.why_by}): {len(table.predicted)} probes judged by "
            f"their layers alone, scaled by {len(table.checks)} whole-model checks"
        )
    return shaped, notes


def _size(space: SearchSpace) -> int:
    """How many values the space's knobs offer, all together."""
    return sum(len(grid(d)) for d in space.distributions.values())


def _reference(study: optuna.Study, executor: Executor, space: SearchSpace) -> Measurements:
    """The uncompressed model's measurements (the "original" baseline's plan), taken once
    per study on the same executor as the trials, and kept on the study so budgets mean
    the same thing when it is resumed. Its latency is refined by every trial (``_Timings``)."""
    ref = reference(study)
    if ref is None:
        outcome = evaluate_now(executor, space.uniform_plan())
        if outcome.measurements is None:
            raise UserError(f"the uncompressed model cannot be evaluated: {outcome.error}")
        ref = outcome.measurements
        study.set_user_attr(REFERENCE, ref.to_dict())
    return ref


def _measure_one_call(study: optuna.Study, config: StudyConfig, task: Task) -> list[str]:
    """For a study that ships to ONNX Runtime, its one-call quantizers (``quantize_dynamic``,
    and ``quantize_static`` where the model has convolutions) on the original, measured
    once per study in the driver before any trial runs (the device lock keeps timings
    apart) and kept on the study; their files go to ``output_dir/baselines/``. One that
    fails is a note, not an error: the search does not depend on it."""
    if task.runtime != "onnxruntime" or ONE_CALL in study.user_attrs:
        return []
    from autosqueeze.measuring.evaluator import Evaluator

    folder = config.output_dir / ONE_CALL_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    has_convs = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in task.model.modules())
    evaluator, measured, notes = Evaluator(task), {}, []
    try:
        for name in ONE_CALL_QUANTIZERS if has_convs else ONE_CALL_QUANTIZERS[:1]:
            try:
                measured[name] = evaluator.one_call(name, folder / f"{name}.onnx").to_dict()
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's quantizer, on any model
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                notes.append(f"ONNX Runtime's {name} failed on the original: {first}")
    finally:
        evaluator.close()
    study.set_user_attr(ONE_CALL, measured)
    return notes


ONE_CALL_FOLDER = "baselines"
"""Where a study's one-call quantizers' files are written, beside ``front/``."""


BASELINES = {"original": {}, "int8": {"bits": 8}}
"""Queued first on every study: what a user would try by hand."""
BASELINE_VALUES = {(k, v) for choices in BASELINES.values() for k, v in choices.items()}
WARM_STARTS: dict[str, dict[str, Any]] = {
    "int6": {"bits": 6},
    "int4": {"bits": 4},
    "int6-bf16": {"bits": 6, "kernel": "bf16"},
    "int8-dynamic": {"bits": 8, "kernel": "int8_dynamic"},
    "int4-kernel": {"bits": 4, "kernel": "int4_weight_only"},
    "channels-0.5": {"bits": 8, "prune_channels": 0.5},
    "channels-0.625": {"bits": 8, "prune_channels": 0.625},
    "separable": {"bits": 8, "separable": 1},
    "ort-int8-static": {"bits": 8, "kernel": "ort_int8_static"},
    "ort-int8-dynamic": {"bits": 8, "kernel": "ort_int8_dynamic"},
    "ort-int8-dynamic-smoothed": {"bits": 8, "kernel": "ort_int8_dynamic", "smooth": 0.9},
}
"""Queued next when there is no sensitivity pass, as the nearest plans the space offers (a
knob or kernel a layer is not offered stays as it is): anchors along the size and speed axes
(on MiniLM, int6 holds cosine 0.99 at 1/5 of the size, a region random start-up trials in 57
dimensions rarely hit; int6 stored and run as bf16 is also 1.5x faster there)."""
SPEED_STARTS = (
    "int6-bf16",
    "int8-dynamic",
    "int4-kernel",
    "channels-0.5",
    "channels-0.625",
    "separable",
)
"""With a sensitivity pass, the knapsack plans take the uniform size anchors' place. Where
the pass timed layers, the speed-first knapsack plans take the kernel anchors' place too;
the latency model does not price channel pruning (it reshapes the neighbours) or depthwise
separation (the size model does not price its shapes), so those anchors stay (on the digits
CNN at 24 trials, the fastest model within budget was 0.73x the original's latency with
the channel anchors and 0.95x without). A space that does not offer separation makes the
``separable`` start the int8 baseline, which is queued once."""
ORT_STARTS = ("ort-int8-static", "ort-int8-dynamic", "ort-int8-dynamic-smoothed")
"""Queued after the baselines in every study that ships to ONNX Runtime: its int8 kernels
on every layer they fit (int8 stored where a layer has none), what its one-call quantizers
do, as plans the search then improves on; queued whatever the latency model says. The
smoothed one is queued where the space offers ``smooth`` and the study has calibration
batches (on MiniLM, alpha 0.9 takes every Linear on ONNX Runtime's int8 from fidelity
0.9928 to 0.9974; from the example input alone it loses)."""
RECOVERED_STARTS = ("channels-0.5", "channels-0.625", "separable")
RECOVERED_VALUES = {(k, v) for name in RECOVERED_STARTS for k, v in WARM_STARTS[name].items()}
"""Kept in the shaped space where recovery training follows the structural change: a probe
does not train, so it judges them by the untrained model, and the space would lose the
anchors (on the digits CNN at 60 trials, the fastest model within budget was 0.90x the
original's with the channel values shaped away, 0.74x for plain random search, which kept
them; separated at m = 1 the residual CNN scores 0.16 untrained, 0.993 recovered)."""


def _enqueue_baselines(
    study: optuna.Study,
    space: SearchSpace,
    config: StudyConfig,
    knapsack: Knapsack | None,
) -> list[str]:
    """The baselines, each ``model.candidates`` student (as distilled, and int8), then the
    knapsack plans (or, without a table, the warm starts): no more
    than ``search.trials``, so a short study leaves none waiting. A study resumed with more
    trials queues those its first run had no room for (Optuna skips the ones it has)."""
    queued_for = study.user_attrs.get(BASELINES_QUEUED)
    if type(queued_for) is int and queued_for >= config.search.trials:
        return []
    study.set_user_attr(BASELINES_QUEUED, config.search.trials)
    notes = []
    queue = _queue(study, room=config.search.trials)

    for name, choices in BASELINES.items():  # exactly that plan, or not at all
        params = space.params_for(space.uniform_plan(**choices))
        if params is None:
            notes.append(f"baseline {name!r} skipped: the space cannot express it")
        else:
            queue(params, {BASELINE: name})
    if space.runtime == "onnxruntime":  # the nearest the space has, like a start
        for name in ORT_STARTS:
            if _calibrated_enough(name, config):
                queue(space.nearest_params(**WARM_STARTS[name]), {BASELINE: name})
    for student in space.students:  # each student as distilled, and at int8
        for start, choices in STUDENT_STARTS.items():
            params = space.nearest_params(**choices) | {BASE: student}
            queue(params, {BASELINE: f"{student}-{start}" if start else student})
    starts: tuple[str, ...] = tuple(WARM_STARTS)
    if knapsack is not None:
        table = knapsack.table
        drop, count = config.budgets.max_metric_drop, config.sensitivity.candidates
        size_first = list(knapsack.plans(ladder(table, count, drop), _size_first(config)))
        for candidate in size_first:
            _queue_candidate(space, candidate, queue)
        _queue_for_students(space, size_first, queue)
        starts = SPEED_STARTS
        if prices_time(config) and table.model_ms and config.sensitivity.speed_candidates:
            levels = ladder(table, config.sensitivity.speed_candidates, drop)
            for candidate in knapsack.plans(levels, SPEED_FIRST):
                _queue_candidate(space, candidate, queue)
            starts = RECOVERED_STARTS
    for name in starts if config.search.warm_starts else ():  # the nearest the space has
        if _calibrated_enough(name, config):
            queue(space.nearest_params(**WARM_STARTS[name]), {BASELINE: name})
    return notes


def _calibrated_enough(start: str, config: StudyConfig) -> bool:
    """Whether a warm start can be queued: one that smooths needs calibration batches (its
    input ranges from the example input alone cost MiniLM fidelity at every alpha)."""
    return "smooth" not in WARM_STARTS[start] or config.task.calibration is not None


def _queue_for_students(space: SearchSpace, candidates: list[Candidate], queue: Callable) -> None:
    """The original's knapsack plans at its budget estimate and one step safer, applied to
    each student's layers of the same names (a student starts from its teacher's layers, so
    they tend to bear what the teacher's bear; the table itself is the original's)."""
    if not candidates or not space.students:
        return
    first = candidates[0].level  # the ladder tries the budget's estimate first
    cautious = sorted((c for c in candidates if c.level <= first), key=lambda c: -c.level)
    for student in space.students:
        for candidate in cautious[:STUDENT_PLANS]:
            if (params := space.params_for(candidate.plan)) is not None:
                queue(params | {BASE: student}, {BASELINE: f"{student}-{KNAPSACK}"})


STUDENT_PLANS = 2
"""Knapsack plans of the original queued for each student (``_queue_for_students``)."""

STUDENT_STARTS: dict[str, dict[str, Any]] = {"": {}, "int8": {"bits": 8}}
"""The plans queued for each ``model.candidates`` student: as distilled, and every layer int8."""


KNAPSACK = "knapsack"


def _queue(study: optuna.Study, *, room: int) -> Callable[[dict[str, Any], dict[str, Any]], bool]:
    """``queue(params, attrs)``: enqueue a plan unless it is queued already or ``room``
    plans are (the trial budget: a short study leaves none waiting); whether it was."""
    queued: list[dict[str, Any]] = []

    def queue(params: dict[str, Any], attrs: dict[str, Any]) -> bool:
        if params in queued or len(queued) >= room:
            return False
        queued.append(params)
        before = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)
        return len(study.get_trials(deepcopy=False)) > before  # skipped: tried before

    return queue


def _queue_candidate(space: SearchSpace, candidate: Candidate, queue: Callable) -> bool:
    """Queue a knapsack plan; whether it was new (not queued before, and there was room)."""
    params = space.params_for(candidate.plan)
    if params is None:
        return False
    attrs = {BASELINE: KNAPSACK, PREDICTED_DISTORTION: candidate.level}
    if candidate.latency is not None:
        attrs[PREDICTED_LATENCY] = round(candidate.latency, 4)
    return queue(params, attrs)


REFINE_STEP = 2
"""Knapsack plans queued per round of refinement: the interval in thirds (in log)."""


def _refine(
    study: optuna.Study,
    config: StudyConfig,
    space: SearchSpace,
    knapsack: Knapsack | None,
    limits: Limits,
) -> None:
    """Once every knapsack plan so far has been measured, queue plans between the largest
    predicted distortion that met the metric budget and the smallest above it that did not,
    ``REFINE_STEP`` a round, up to ``sensitivity.refine`` in all: a bisection that closes
    in on where the budget really falls on the additive model's scale (which misjudges
    interactions), and so on the smallest plan within it."""
    done = study.user_attrs.get(REFINED, 0)
    done = config.sensitivity.refine if type(done) is not int else done  # True: an old study
    if knapsack is None or done >= config.sensitivity.refine:
        return
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(BASELINE) == KNAPSACK]
    if not trials or any(t.state not in FINISHED for t in trials):
        return
    if not finished_last(study, trials):  # two drivers refining would both find room
        return
    tried = [
        (t.user_attrs[PREDICTED_DISTORTION], _met(t.user_attrs.get("metric"), limits))
        for t in trials
        if t.state != optuna.trial.TrialState.FAIL and PREDICTED_DISTORTION in t.user_attrs
    ]
    step = min(REFINE_STEP, config.sensitivity.refine - done)
    queue = _queue(study, room=config.search.trials - taken_count(study, waiting=True))
    queued = [
        _queue_candidate(space, candidate, queue)
        for candidate in knapsack.plans(refined_levels(tried, step), _size_first(config))
    ]
    # a round that finds no new plan would find none again: the interval is as fine as
    # the options allow
    study.set_user_attr(REFINED, done + step if any(queued) else config.sensitivity.refine)


def _met(metric: float | None, limits: Limits) -> bool:
    return metric is not None and (limits.min_metric is None or metric >= limits.min_metric)


def _loop(
    study: optuna.Study,
    config: StudyConfig,
    space: SearchSpace,
    executor: Executor,
    ref: Measurements,
    progress: bool,
    refine: Callable[[Limits], None],
) -> tuple[int, int | None]:
    """Trials run; the signal that stopped the loop, if one did."""
    target = config.search.trials
    deadline = time.monotonic() + config.search.timeout_s if config.search.timeout_s else None
    distributions = space.distributions
    bar = progress_bar(
        total=target,
        initial=min(finished_count(study), target),
        unit="trial",
        desc=config.name,
        enabled=progress,
    )
    stats = _Stats(study)
    bar.set_postfix_str(stats.summary())
    timings = reference_timings(ref, study.get_trials(deepcopy=False))
    early = config.sensitivity.early_stop if config.sensitivity.enabled else None
    limits = Limits.of(config.budgets, ref.metric, early)  # a trial past them stops early
    lock = DeviceLock(torch.device(config.budgets.device))
    asked: dict[int, optuna.Trial] = {}
    ran = 0
    signals = _StopSignals()
    try:
        with signals:
            while True:
                out_of_time = deadline is not None and time.monotonic() > deadline

                def room(out_of_time: bool = out_of_time) -> bool:
                    return (
                        not out_of_time
                        and len(executor.in_flight) < executor.slots
                        and taken_count(study) < target  # counts other drivers' trials too
                    )

                # sampling computes too: never beside a latency timing. Only taken when there
                # is room: an evaluator hung while holding the device lock is killed in
                # ``wait``, which the driver must reach without waiting for that lock
                with lock.shared() if room() else contextlib.nullcontext(), signals.held():
                    if room():
                        refine(limits)
                    while room():
                        trial = study.ask(distributions)
                        plan = space.plan(trial.params)
                        if isinstance(study.sampler, KnapsackSampler):
                            if study.sampler.proposal(trial.number) is not None:
                                trial.set_user_attr(PROPOSED, KNAPSACK)
                        trial.set_user_attr(DRIVER, DRIVER_ID)
                        trial.set_user_attr(PLAN, plan.to_json())
                        asked[trial.number] = trial
                        executor.submit(trial.number, plan, limits)
                if not executor.in_flight:
                    break
                # signals wait for Ray's wait to return: one raised inside it can be lost
                with signals.held() if executor.evaluates_elsewhere else contextlib.nullcontext():
                    outcomes = executor.wait(timeout=_POLL_S)
                signals.check()
                with lock.shared() if outcomes else contextlib.nullcontext(), signals.held():
                    for outcome in outcomes:
                        _tell(study, config, ref, timings, asked.pop(outcome.key), outcome, stats)
                        ran += 1
                        bar.update(min(finished_count(study), target) - bar.n)
                        bar.set_postfix_str(stats.summary())
    except KeyboardInterrupt as stop:
        _exit_on_another_signal()
        # by the signal that came first: Ray re-raises what it caught as a KeyboardInterrupt
        by = signals.caught[0] if signals.caught else signal.SIGINT
        if isinstance(stop, Terminated):
            by = signal.SIGTERM
        why = "by SIGTERM" if by == signal.SIGTERM else "by the user (Ctrl-C)"
        for trial in asked.values():  # submitted or only just asked: none is left RUNNING
            fail_trial(study, trial, f"interrupted {why}", requeue=True)
        return ran, by
    finally:
        bar.close()
    return ran, None


def _shipped_as(task: Task) -> Callable[[bytes], tuple[str, bytes]] | None:
    """How a front member's file is made for ``budgets.runtime`` other than torch (the
    ONNX export of its artifact), or None: the artifact is the file."""
    if task.runtime == "torch":
        return None
    from autosqueeze.measuring.evaluator import Evaluator

    return Evaluator(task).shipped_file


_POLL_S = 1.0  # how often the driver looks up from waiting on Ray for a remembered signal
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_on_another_signal() -> None:
    """After a first Ctrl-C or SIGTERM the search winds down (its running trials failed and
    re-queued, Ray shut down); a second one exits at once, with 128 + its number. Nothing
    is lost: a trial left RUNNING is re-queued by the next run (``recover_interrupted``)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def now(signum: int, _frame: Any) -> None:
        print(
            "autosqueeze: stopped at once (a second signal); trials left running are "
            "re-queued by the next run.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    for number in _SIGNALS:
        signal.signal(number, now)


def _current_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.getsignal(number) for number in _SIGNALS}


def _restore_handlers(handlers: dict[int, Any]) -> None:
    for number, handler in handlers.items():
        if handler is not None:
            signal.signal(number, handler)


class _StopSignals:
    """Ctrl-C and SIGTERM while the loop runs. Each reaches its usual handler where it lands
    (KeyboardInterrupt; the CLI's Terminated), except while ``held``: then it is only
    remembered and raised when the block ends. The driver holds them while it records trials
    (a trial asked but not yet in ``asked``, or taken from the executor but not yet told,
    would otherwise stay RUNNING) and while it waits on Ray (an exception raised inside
    Ray's wait can be lost: seen in CI, the search went on or hung); ``check`` raises one
    remembered since."""

    def __init__(self) -> None:
        self.caught: list[int] = []
        self._handlers: dict[int, Callable[..., Any]] = {}
        self._holding = False

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it gets signals
            for number in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(number)
                if callable(handler):  # not SIG_DFL or SIG_IGN: nothing of ours to deliver
                    self._handlers[number] = handler
                    signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *_: object) -> None:
        for number, handler in self._handlers.items():
            signal.signal(number, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.caught.append(signum)
        if not self._holding:
            self._handlers[signum](signum, frame)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        self.check()

    def check(self) -> None:
        if self.caught:
            self._handlers[self.caught[0]](self.caught[0], None)


def _tell(
    study: optuna.Study,
    config: StudyConfig,
    ref: Measurements,
    timings: list[float],
    trial: optuna.Trial,
    outcome: Outcome,
    stats: _Stats,
) -> None:
    """Record an outcome: measurements as user attributes, budgets as constraints; a trial
    that stopped early is PRUNED with its reason, one that completed is told its values."""
    if outcome.worker:
        trial.set_user_attr("worker", outcome.worker)
    got = outcome.measurements
    if got is None:
        fail_trial(study, trial, outcome.error or "unknown failure")
        return
    if got.reference_latency_ms:
        timings.append(got.reference_latency_ms)
    trial.set_user_attr("measured_latency_ms", got.latency_ms)
    got = got.at_reference(robust_latency(timings) or ref.latency_ms or 0.0)
    for key, value in got.to_dict().items():
        trial.set_user_attr(key, value)
    limits = constraints(config, ref, got)
    for key, value in limits.items():
        trial.set_constraint(key, value)
    if got.stopped:  # its reason is the "stopped" attribute
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    study.tell(trial, objective_values(config, got))
    stats.add(got, all(v <= 0 for v in limits.values()))


class _Stats:
    """Running figures for the progress bar: feasible count, best size and metric."""

    def __init__(self, study: optuna.Study) -> None:
        self.feasible = 0
        self.best_size: int | None = None
        self.best_metric: float | None = None
        for record in records(study):
            if record.feasible and record.measurements:
                self.add(record.measurements, True)

    def add(self, got: Measurements, feasible: bool) -> None:
        if not feasible:
            return
        self.feasible += 1
        self.best_size = min(self.best_size or got.size_bytes, got.size_bytes)
        self.best_metric = max(self.best_metric or got.metric, got.metric)

    def summary(self) -> str:
        if not self.feasible or self.best_size is None:  # one is set with the other
            return "feasible=0"
        return (
            f"feasible={self.feasible} smallest={self.best_size / 1e3:.1f}kB "
            f"best_metric={self.best_metric:.4f}"
        )
