"""Each layer's sensitivity, learned before the search, and what the search does with it.

A probe applies one value of one knob to one layer (or tied group), everything else left as
it was, and judges the model on the first ``sensitivity.samples`` validation samples: no
artifact, no timing. The table of probes (metric lost per layer x knob x value) is kept on
the study, so a resumed or second driver reuses it. From it the search

- drops, per layer, values whose effect alone already passes the metric budget by a margin
  (``shaped_space``): random or TPE sampling in 50-100 dimensions otherwise almost always
  breaks some layer;
- solves a multiple-choice knapsack exactly (``candidate_plans``): one choice per layer,
  the fewest predicted bytes (or, speed first, the least predicted time, from the layers'
  timings) whose predicted distortion (the sum of the layers') is within each of several
  levels across the budget. These plans are tried first, as HAWQ-V3, Sony MCT and
  ModelOpt's auto_quantize do once; the sampler then searches around them with real
  measurements.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from autosqueeze.common.quiet import STDOUT, silenced
from autosqueeze.compression.size_model import (
    SIZE_KNOBS,
    StoredWeights,
    layer_bytes,
    onnx_layer_bytes,
    stored_weights,
)
from autosqueeze.compression.techniques import TECHNIQUES, technique_for
from autosqueeze.measuring.measure import ProbeResult
from autosqueeze.plans.plan import Plan
from autosqueeze.searching.probe import BASE, Probe
from autosqueeze.searchspace.space import LayerKnobs, SearchSpace

TABLE_FORMAT = 2  # 2: layer timings (the latency model)
MAX_RANGE_PROBES = 10  # a range knob is probed at this many points at most


def _speed_knobs() -> set[str]:
    """The knobs the latency model prices: they change how a layer runs and leave its
    neighbours alone, and the size model prices any change of shape they make (not a
    depthwise separation: read when asked, a technique may be registered after import)."""
    return {
        k
        for k, t in TECHNIQUES.items()
        if t.changes_speed and not t.reaches_neighbours and (not t.structural or k in SIZE_KNOBS)
    }


@dataclass
class SensitivityTable:
    """Per probe, on the first ``samples`` samples: the metric lost against ``base`` (the
    space's fixed choices alone) and the outputs' distortion (``metrics.distortion``)."""

    samples: int
    base: float | None = None
    drops: dict[str, float] = field(default_factory=dict)  # probe key -> base - metric
    distortions: dict[str, float] = field(default_factory=dict)  # probe key -> distortion
    failed: dict[str, str] = field(default_factory=dict)  # probe key -> why
    seconds: float = 0.0
    # the latency model: per probe that changes how its layers run, those layers' probed
    # time over their original time (timed side by side), and their original milliseconds
    speeds: dict[str, float] = field(default_factory=dict)
    layer_ms: dict[str, float] = field(default_factory=dict)
    model_ms: float | None = None  # the whole original model, as the evaluators time it
    untimed: dict[str, str] = field(default_factory=dict)  # probe key -> why not timed
    # probe key -> why not probed: a weaker value of its knob already broke the layer
    skipped: dict[str, str] = field(default_factory=dict)
    # the pass by layer (``sensitivity.by``): which pass, and why; per probe (and the base),
    # the changed layers' own errors, run alone; the whole-model checks that scale them; and
    # the probes whose drop and distortion are predicted from them, not measured
    by: str | None = None
    why_by: str = ""
    layer_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)

    def done(self, key: str) -> bool:
        if key == BASE:
            return self.base is not None
        return key in self.drops or key in self.failed or key in self.skipped

    def drop(self, probe: Probe) -> float:
        """The metric a probe lost (inf if it failed or was skipped); a range value between
        two probed points is read off the line between them."""
        return _lookup(self.drops, self.failed, probe, self.skipped)

    def distortion(self, probe: Probe) -> float:
        return _lookup(self.distortions, self.failed, probe, self.skipped)

    def speed(self, probe: Probe) -> float:
        """The probed layers' time over their original time (1.0 where not timed)."""
        value = _lookup(self.speeds, {}, probe, {})
        return value if math.isfinite(value) else 1.0

    def group_ms(self, group: str) -> float | None:
        """The original milliseconds of a group's layers: the median over its probes, scaled
        down where the groups together would take longer than the whole model (each was
        timed apart from the model, and a sustained load slows what it meets: the layers
        are part of the model, so their time cannot pass its)."""
        medians = self._group_medians()
        if group not in medians:
            return None
        total = sum(medians.values())
        scale = min(1.0, self.model_ms / total) if self.model_ms and total > 0 else 1.0
        return medians[group] * scale

    def _group_medians(self) -> dict[str, float]:
        found: dict[str, list[float]] = {}
        for key, ms in self.layer_ms.items():
            found.setdefault(_group_of(key), []).append(ms)
        return {g: float(np.median(v)) for g, v in found.items()}

    def predicted_latency(self, space: SearchSpace, plan: Plan) -> float | None:
        """The plan's latency as a fraction of the original's, by the additive latency
        model: the original's, plus each group's change (its original milliseconds times
        the product of its values' speeds, less its original milliseconds). None without
        timings."""
        if not self.model_ms:
            return None
        change = 0.0
        for prefix, layer in _first_layers(space).items():
            lp = plan.layers.get(layer.name)
            ms = self.group_ms(prefix)
            if lp is None or ms is None:
                continue
            ratio = math.prod(
                self.speed(Probe(prefix, knob, getattr(lp, knob)))
                for knob in layer.searched
                if technique_for(knob).changes_speed
                and getattr(lp, knob) != technique_for(knob).identity
            )
            change += ms * (ratio - 1.0)
        return max(0.0, 1.0 + change / self.model_ms)

    def predicted_distortion(self, space: SearchSpace, plan: Plan) -> float | None:
        """The plan's distortion by the additive model: the sum of its values' own (none
        below zero). None when it uses a knob the knapsack does not price (channel pruning:
        recovery training wins back what its probe loses) or a value whose probe failed."""
        total = 0.0
        for prefix, layer in _first_layers(space).items():
            lp = plan.layers.get(layer.name)
            if lp is None:
                continue
            values = {knob: getattr(lp, knob) for knob in layer.searched}
            changed = {k for k, v in values.items() if v != technique_for(k).identity}
            if changed - {*SIZE_KNOBS, *_speed_knobs()}:
                return None
            total += self.group_distortion(prefix, values)
        return total if math.isfinite(total) else None

    def group_distortion(self, group: str, values: dict[str, Any]) -> float:
        """A group's distortion by the additive model: the sum of its changed values' own,
        none below zero (inf where a probe failed)."""
        return sum(
            max(0.0, self.distortion(Probe(group, knob, value)))
            for knob, value in values.items()
            if value != technique_for(knob).identity
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "samples": self.samples,
            "base": self.base,
            "drops": self.drops,
            "distortions": self.distortions,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "speeds": self.speeds,
            "layer_ms": self.layer_ms,
            "model_ms": self.model_ms,
            "untimed": self.untimed,
            "skipped": self.skipped,
            "by": self.by,
            "why_by": self.why_by,
            "layer_errors": self.layer_errors,
            "checks": self.checks,
            "predicted": self.predicted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, samples: int) -> SensitivityTable:
        """A stored table, or an empty one when none (or none readable) was stored for these
        samples: the study is someone's file, and a table that is not what this code writes
        is measured again rather than believed."""
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            return cls(samples)
        parts: list[Any] = [data.get(k) for k in ("drops", "distortions", "failed")]
        timings: list[Any] = [data.get(k) for k in ("speeds", "layer_ms", "untimed")]
        skipped = data.get("skipped", {})  # absent from tables written before it existed
        numbers = [parts[0], parts[1], timings[0], timings[1]]
        base, seconds, model_ms = data.get("base"), data.get("seconds"), data.get("model_ms")
        if (
            data.get("samples") != samples
            or not all(isinstance(p, dict) for p in [*parts, *timings, skipped])
            or not all(_number_or_none(v) for d in numbers for v in d.values())
            or not all(_number_or_none(x) for x in (base, model_ms))
            or not isinstance(seconds, (int, float))
        ):
            return cls(samples)
        (drops, distortions, failed), (speeds, layer_ms, untimed) = parts, timings
        table = cls(
            samples, base, drops, distortions, failed, seconds, speeds, layer_ms, model_ms,
            untimed, skipped,
        )  # fmt: skip
        return _by_layer_parts(table, data)

    def report(self, space: SearchSpace) -> dict[str, Any]:
        """What ``autosqueeze sensitivity --json`` prints."""
        return {
            "samples": self.samples,
            "base": self.base,
            "seconds": round(self.seconds, 3),
            "model_ms": self.model_ms,
            "by": self.by,
            "why_by": self.why_by,
            "rows": self.rows(space),
        }

    def rows(self, space: SearchSpace) -> list[dict[str, Any]]:
        """One row per probe, in model order."""
        return [
            {
                "group": p.group,
                "knob": p.knob,
                "value": p.value,
                "drop": self.drops.get(p.key),
                "distortion": self.distortions.get(p.key),
                "speed": self.speeds.get(p.key),
                "layer_ms": self.layer_ms.get(p.key),
                "error": self.failed.get(p.key),
                "skipped": self.skipped.get(p.key),
                # by layer: predicted from its layers' error (else measured by whole model)
                "predicted": p.key in self.predicted,
            }
            for p in probes_of(space)
        ]


def _by_layer_parts(table: SensitivityTable, data: dict[str, Any]) -> SensitivityTable:
    """The pass by layer's parts of a stored table (absent from tables written before it):
    all of them where they are what this code writes, else none, and the probes they
    predicted measured again."""
    by, why, errors = data.get("by"), data.get("why_by", ""), data.get("layer_errors", {})
    checks, predicted = data.get("checks", []), data.get("predicted", [])
    fine = (
        by in (None, "model", "layer")
        and isinstance(why, str)
        and isinstance(errors, dict)
        and all(isinstance(e, dict) for e in errors.values())
        and all(_number_or_none(v) for e in errors.values() for v in e.values())
        and _keys(checks)
        and _keys(predicted)
    )
    if fine:
        table.by, table.why_by, table.layer_errors = by, why, errors
        table.checks, table.predicted = checks, predicted
    else:
        for key in predicted if _keys(predicted) else []:
            table.drops.pop(key, None)
            table.distortions.pop(key, None)
    return table


def _keys(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(k, str) for k in value)


def _number_or_none(value: Any) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _group_of(key: str) -> str:
    """A probe key's group: ``encoder.layer.0.kernel="bf16"`` -> ``encoder.layer.0``."""
    probe = Probe.of(key)
    return probe.group if probe else ""


def _first_layers(space: SearchSpace) -> dict[str, LayerKnobs]:
    """Each group's first layer (a group's layers share its knobs)."""
    seen: dict[str, LayerKnobs] = {}
    for layer in space.layers.values():
        seen.setdefault(layer.prefix, layer)
    return seen


def _lookup(
    values: dict[str, float], failed: dict[str, str], probe: Probe, skipped: dict[str, str]
) -> float:
    if probe.key in values:
        return values[probe.key]
    if probe.key in failed or probe.key in skipped:
        return math.inf
    probed = ((Probe.of(key), value) for key, value in values.items())
    known = sorted((p.value, value) for p, value in probed if p and p.param == probe.param)
    if not known or isinstance(probe.value, str):
        return math.inf
    xs, ys = zip(*known, strict=True)
    return float(np.interp(probe.value, xs, ys))


def probes_of(space: SearchSpace) -> list[Probe]:
    """Every searched (group, knob, value) but the value that leaves the layer alone."""
    return [
        Probe(layer.prefix, knob, value)
        for layer in _first_layers(space).values()
        for knob, dist in layer.searched.items()
        for value in probe_values(dist)
        if value != technique_for(knob).identity
    ]


def probe_values(dist: BaseDistribution) -> list[Any]:
    """The values probed: all of a choice; of a range, ``MAX_RANGE_PROBES`` spread evenly."""
    values = grid(dist)
    if isinstance(dist, CategoricalDistribution) or len(values) <= MAX_RANGE_PROBES:
        return values
    picks = np.linspace(0, len(values) - 1, MAX_RANGE_PROBES).round().astype(int)
    return [values[i] for i in sorted(set(picks.tolist()))]


def grid(dist: BaseDistribution) -> list[Any]:
    """Every value a distribution offers (a range without a step: ten points)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    step = dist.step or (dist.high - dist.low) / (MAX_RANGE_PROBES - 1)
    count = int(round((dist.high - dist.low) / step)) + 1
    values = [dist.low + i * step for i in range(count)]
    if isinstance(dist, IntDistribution):
        return [int(v) for v in values]
    return [round(v, 10) for v in values]


def probe_plan(space: SearchSpace, probe: Probe | None) -> Plan:
    """The space's fixed choices, plus the probe's one value on its group."""
    return space.plan({} if probe is None else {probe.param: probe.value})


Probes = Callable[[dict[str, Plan]], Iterator[tuple[str, ProbeResult]]]
"""An executor's ``probes``, ``layer_probes`` or ``timings``."""


def measure_sensitivity(
    space: SearchSpace,
    run: Probes,
    table: SensitivityTable,
    save: Callable[[SensitivityTable], None],
    *,
    timings: Probes | None = None,
    stop_drop: float | None = None,
    save_every_s: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
    by_layer: Probes | None = None,
    by: tuple[str, str] = ("model", ""),
    checks: int = 8,
) -> SensitivityTable:
    """Run the probes ``table`` lacks through ``run`` (an executor's ``probes``), then the
    timings it lacks through ``timings`` (its ``timings``: apart, so that a timing, which
    holds the device alone, never waits for another evaluator's probe), saving the table
    as results arrive (so an interrupted pass resumes where it stopped).

    With ``stop_drop``, a knob whose harm grows with its strength (bits, prune, rank,
    channels) is probed on each layer weakest value first, in waves across the layers, and
    a layer's stronger values are skipped once one loses more than ``stop_drop``: they
    would only lose more. (A probe that fails says nothing of the next: a crash or a
    timeout is not a loss.)

    The pass by layer (``by``: which pass, and why; a table keeps the pass it began with):
    every probe that keeps its layers' neighbours as they are runs through ``by_layer``
    (the executor's ``layer_probes``: the changed layers alone, on the inputs they took in
    the original), then ``checks`` of them run through ``run`` as well, and the others'
    distortion and metric drop are predicted from their layers' error at the checks' scale
    (``_predict``). Probes that reshape neighbours (channels, heads) are whole-model ones
    either way."""
    wanted = {BASE: probe_plan(space, None)} | {
        p.key: probe_plan(space, p) for p in probes_of(space)
    }
    timed_keys = [
        p.key
        for p in probes_of(space)
        if technique_for(p.knob).changes_speed and not technique_for(p.knob).reaches_neighbours
    ]
    if timings is None:
        timed_keys = []
    local = [p.key for p in probes_of(space) if not technique_for(p.knob).reaches_neighbours]
    results: dict[str, float] = {}
    start = last_save = time.monotonic()

    def settled(key: str) -> bool:  # timed, or never to be (failed, skipped, no timing)
        parts = (table.speeds, table.untimed, table.skipped, table.failed)
        return any(key in part for part in parts)

    by_model = list(wanted)  # by layer: the base and the probes that reshape (or fail there)
    unjudged: dict[str, str] = {}  # probes the pass by layer could not judge: why

    def layer_work() -> list[bool]:
        if table.by != "layer":
            return []
        probed = [k in table.layer_errors or k in unjudged for k in [BASE, *local]]
        return probed + [k in table.drops or k in table.failed for k in table.checks]

    def total() -> int:
        return len(by_model) + len(timed_keys) + len(layer_work())

    def count_done() -> int:
        done = sum(map(table.done, by_model)) + sum(map(settled, timed_keys))
        return done + sum(layer_work())

    def record(key: str, got: ProbeResult) -> None:
        if got.error is not None or got.metric is None or not math.isfinite(got.metric):
            table.failed[key] = got.error or f"the metric is {got.metric}"
        elif key == BASE:
            table.base = got.metric
        else:
            results[key] = got.metric
            if got.distortion is not None and math.isfinite(got.distortion):
                table.distortions[key] = got.distortion
        if table.base is not None:  # drops are against the base, which is probed first
            table.drops.update({k: table.base - m for k, m in results.items()})
            results.clear()

    def record_layers(key: str, got: ProbeResult) -> None:
        if got.layer_errors is not None:
            table.layer_errors[key] = got.layer_errors
        elif key != BASE:  # a whole-model probe then, with the reshaping ones
            unjudged[key] = got.error or "no layer errors"
            table.layer_errors.pop(key, None)

    def record_timing(key: str, got: ProbeResult) -> None:
        if got.layer_ms is not None and min(got.layer_ms) > 0:
            table.layer_ms[key] = got.layer_ms[0]
            table.speeds[key] = got.layer_ms[1] / got.layer_ms[0]
        else:
            table.untimed[key] = got.error or "its layers did not run on the example input"
        if got.model_ms is not None and got.model_ms > 0:  # a disturbance only slows it
            table.model_ms = min(table.model_ms or math.inf, got.model_ms)

    measured = False  # a table with nothing to measure is read, not written

    def step(phase: Iterator[tuple[str, ProbeResult]], each: Callable) -> None:
        nonlocal start, last_save, measured
        for key, got in phase:
            measured = True
            each(key, got)
            if progress:
                progress(count_done(), total())
            if time.monotonic() - last_save > save_every_s:
                table.seconds += time.monotonic() - start
                start = last_save = time.monotonic()
                save(table)

    try:
        first = {BASE: wanted[BASE]} if not table.done(BASE) else {}
        if table.by is None:  # a table keeps its pass (one from before these: by model)
            fresh = bool(first) and by_layer is not None
            table.by, table.why_by = by if fresh else ("model", "")
        if table.by == "layer" and by_layer is not None:
            step(run(first), record)
            first = {}
            by_model = [k for k in wanted if k not in local]
            lacking = [k for k in [BASE, *local] if k not in table.layer_errors]
            step(by_layer({k: wanted[k] for k in lacking}), record_layers)
            by_model += list(unjudged)
            judged = [k for k in local if k in table.layer_errors]
            errors = {k: _own_error(space, table, k) for k in judged}
            table.checks = table.checks or _checks(errors, checks)
            step(run({k: wanted[k] for k in table.checks if not table.done(k)}), record)
            _predict(table, errors)
        chains = _chains(space) if stop_drop is not None else [[k] for k in wanted if k != BASE]
        judged_by_model = set(by_model)
        chains = [kept for chain in chains if (kept := [k for k in chain if k in judged_by_model])]
        wave = first | _next_wave(chains, table, wanted, stop_drop)
        while wave:
            step(run(wave), record)
            wave = _next_wave(chains, table, wanted, stop_drop)
        untimed = {k: wanted[k] for k in timed_keys if not settled(k)}
        if untimed and timings is not None:
            step(timings(untimed), record_timing)
        if progress:
            progress(count_done(), total())
    finally:
        for name in ("drops", "distortions", "failed", "skipped", "speeds", "layer_ms", "untimed"):
            found = getattr(table, name)  # in model order, for the reports
            setattr(table, name, {k: found[k] for k in wanted if k in found})
        if measured:
            table.seconds += time.monotonic() - start
            save(table)
    return table


def _own_error(space: SearchSpace, table: SensitivityTable, key: str) -> float:
    """A probe's own error by layer: its group's layers' errors less what the space's fixed
    choices alone cost each (the base's)."""
    probe = Probe.of(key)
    assert probe is not None
    base = table.layer_errors.get(BASE, {})
    return sum(
        max(0.0, error - base.get(name, 0.0))
        for name, error in table.layer_errors[key].items()
        if space.layers.get(name) is not None and space.layers[name].prefix == probe.group
    )


def _checks(errors: dict[str, float], count: int) -> list[str]:
    """The probes checked by whole model: ``count`` spread evenly (in rank) over those with
    an error, from the median up to the 90th percentile, each group once where it can be:
    the errors around where a budget falls, not the smallest (which lose nothing measurable)
    nor the largest (which break the model, where error and loss part ways)."""
    ranked = sorted((e, k) for k, e in errors.items() if e > 0)
    if not ranked:
        return []
    middle = ranked[len(ranked) // 2 : max(len(ranked) // 2 + 1, len(ranked) * 9 // 10)]
    picks = np.linspace(0, len(middle) - 1, min(count, len(middle))).round().astype(int)
    chosen, groups = [], set()
    for i in picks.tolist():
        for _, key in middle[i:] + middle[:i]:  # the nearest of a group not yet checked
            group = _group_of(key)
            if key not in chosen and group not in groups:
                chosen.append(key)
                groups.add(group)
                break
    return chosen


def _predict(table: SensitivityTable, errors: dict[str, float]) -> None:
    """Each probe judged by layer and not checked: distortion = its error x the checks'
    median ratio of distortion to error; drop = that distortion x the checks' drop per
    distortion (least squares through 0). Layer errors add as the model's distortion does,
    to first order; a layer whose error grows or shrinks on its way to the outputs more
    than the checked ones is mispriced by what it differs, which the measured plans then
    find out."""
    checked = [
        k for k in table.checks if k in table.distortions and k in table.drops and k in errors
    ]
    ratios = [table.distortions[k] / errors[k] for k in checked if errors[k] > 0]
    if not ratios:
        return
    gain = float(np.median(ratios))
    squares = sum(table.distortions[k] ** 2 for k in checked)
    per = sum(table.drops[k] * table.distortions[k] for k in checked) / squares if squares else 0.0
    predicted = []
    for key, error in errors.items():
        if key in checked:  # measured
            continue
        table.distortions[key] = gain * error
        table.drops[key] = per * gain * error
        predicted.append(key)
    table.predicted = predicted


CHAIN_STOP = 3.0
"""A layer's stronger values are not probed once one loses this many times the drop at
which the search's space leaves a value out (``sensitivity.margin`` x the metric budget):
well past it, so a few unlucky samples of the probe's subset do not end the chain."""


def _chains(space: SearchSpace) -> list[list[str]]:
    """Each (layer, knob)'s probe keys, weakest value first where harm grows with strength
    (``Technique.harm_grows_with_strength``); a key alone for any other knob's values."""
    found: dict[tuple[str, str], list[Probe]] = {}
    for probe in probes_of(space):
        found.setdefault((probe.group, probe.knob), []).append(probe)
    chains = []
    for (_, knob), probes in found.items():
        technique = technique_for(knob)
        if technique.harm_grows_with_strength:
            ordered = sorted(probes, key=lambda p: technique.strength(p.value))
            chains.append([p.key for p in ordered])
        else:
            chains += [[p.key] for p in probes]
    return chains


def _next_wave(
    chains: list[list[str]],
    table: SensitivityTable,
    wanted: dict[str, Plan],
    stop_drop: float | None,
) -> dict[str, Plan]:
    """The first probe each chain still lacks; a chain whose last probed value broke the
    model (lost more than ``stop_drop``) has the rest marked skipped instead."""
    wave = {}
    for chain in chains:
        for i, key in enumerate(chain):
            if not table.done(key):
                wave[key] = wanted[key]
                break
            broke = stop_drop is not None and table.drops.get(key, 0.0) > stop_drop
            if broke:
                lost = f"lost {table.drops[key]:.4g}"
                for rest in chain[i + 1 :]:
                    if not table.done(rest):
                        table.skipped[rest] = f"not probed: the weaker {_value_of(key)} {lost}"
                break
    return wave


def _value_of(key: str) -> str:
    """``encoder.layer.0.bits=4`` -> ``bits=4``."""
    probe = Probe.of(key)
    return f"{probe.knob}={json.dumps(probe.value)}" if probe else key


# --- what the search does with the table ----------------------------------------------------


def shaped_space(
    space: SearchSpace,
    table: SensitivityTable,
    max_drop: float,
    margin: float,
    *,
    keep: set,
    max_distortion: float | None = None,
) -> SearchSpace:
    """The space without the values whose effect alone passes ``margin * max_drop``, or
    whose distortion alone passes ``max_distortion`` (a value that spends the whole
    budget's distortion leaves nothing for the other layers: on the residual CNN, every
    sampled trial of a space shaped by the metric alone missed the budget). Values
    in ``keep`` (``(knob, value)``: what the baselines use) and each knob's identity stay.
    A knob with one value left is fixed at it; a range shrinks to the probed values that
    pass, up to the first that does not. A probe does not train, so for structural knobs
    that recovery training follows it overstates the harm; a value that alone loses more
    than the budget (times the margin) is still rarely one training wins back."""
    limit = margin * max_drop
    layers = {}
    for name, layer in space.layers.items():
        searched, fixed = {}, dict(layer.fixed)
        for knob, dist in layer.searched.items():
            forced = {v for v in probe_values(dist) if (knob, v) in keep}
            kept = forced | {
                v
                for v in probe_values(dist)
                if _harmless(table, Probe(layer.prefix, knob, v), limit, max_distortion)
            }
            shaped = _shaped(dist, technique_for(knob).identity, kept, forced)
            if isinstance(shaped, BaseDistribution):
                searched[knob] = shaped
            else:
                fixed[knob] = shaped
        layers[name] = replace(layer, searched=searched, fixed=fixed)
    return replace(space, layers=layers)


def _harmless(
    table: SensitivityTable, probe: Probe, max_drop: float, max_distortion: float | None
) -> bool:
    if table.drop(probe) > max_drop:
        return False
    return max_distortion is None or table.distortion(probe) <= max_distortion


def _shaped(
    dist: BaseDistribution, identity: Any, kept: set, forced: set
) -> BaseDistribution | Any:
    """``dist`` keeping the identity and the ``kept`` values: a range keeps the stretch from
    the identity up to the first probed value not kept, or to the farthest ``forced`` one
    (a value the queued plans use) if that is farther."""
    if isinstance(dist, CategoricalDistribution):
        choices = [c for c in dist.choices if c == identity or c in kept]
        return CategoricalDistribution(choices) if len(choices) > 1 else choices[0]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    reach = identity
    for value in sorted(probe_values(dist), key=lambda v: abs(v - identity)):
        if value != identity and value not in kept:
            break
        reach = value
    reach = max([reach, *forced], key=lambda v: abs(v - identity))
    low, high = sorted((identity, reach))
    low, high = max(low, dist.low), min(high, dist.high)
    return replace_range(dist, low, high) if high > low else low


def replace_range(
    dist: FloatDistribution | IntDistribution, low: Any, high: Any
) -> FloatDistribution | IntDistribution:
    if isinstance(dist, IntDistribution):
        return IntDistribution(int(low), int(high), step=dist.step, log=dist.log)
    if dist.step:  # Optuna wants (high - low) a multiple of the step
        high = low + math.floor((high - low) / dist.step + 1e-9) * dist.step
    return FloatDistribution(low, round(high, 10), step=dist.step, log=dist.log)


@dataclass(frozen=True)
class Option:
    """One group's choice for the knapsack: its knob values, predicted distortion, bytes,
    and change in milliseconds (negative: faster; 0 without timings)."""

    values: dict[str, Any]
    distortion: float
    nbytes: int
    ms: float = 0.0


def group_options(
    space: SearchSpace, table: SensitivityTable, model: nn.Module
) -> dict[str, list[Option]]:
    """Per group, every combination of its size knobs' values and, where the table has
    timings, of the knobs that change its speed but not its shape's neighbours (kernel,
    rank); the rest left as they are. Each with the predicted distortion (the sum of its
    values' own, none below zero), the predicted bytes of its weights (``layer_bytes``) and
    the predicted change in milliseconds (its original time times the product of its
    values' speeds, less its original time)."""
    modules = dict(model.named_modules())
    members: dict[str, list[LayerKnobs]] = {}
    for layer in space.layers.values():
        members.setdefault(layer.prefix, []).append(layer)
    options = {}
    stored: dict[tuple[str, int, int], StoredWeights] = {}
    speed_knobs = _speed_knobs()
    in_onnx = space.runtime == "onnxruntime"  # a kernel there decides the stored bytes too
    for prefix, layers in members.items():
        ms = table.group_ms(prefix) if table.model_ms else None
        knobs = {
            k: d
            for k, d in layers[0].searched.items()
            if k in SIZE_KNOBS or (ms is not None or in_onnx) and k in speed_knobs
        }
        choices = {k: probe_values(d) for k, d in knobs.items()}
        found = []
        for combo in itertools.product(*choices.values()):
            values = dict(zip(choices, combo, strict=True))
            harm = table.group_distortion(prefix, values)
            if not math.isfinite(harm):
                continue
            if in_onnx:
                chosen = {**layers[0].fixed, **values}
                nbytes = sum(
                    onnx_layer_bytes(modules[m.name], chosen, m.settings["group_size"])
                    for m in layers
                )
            else:
                nbytes = _artifact_bytes(layers, modules, {**layers[0].fixed, **values}, stored)
            speed = math.prod(
                table.speed(Probe(prefix, k, v))
                for k, v in values.items()
                if k in speed_knobs and v != technique_for(k).identity  # untouched: as it was
            )
            found.append(Option(values, harm, nbytes, (ms or 0.0) * (speed - 1.0)))
        if found:
            options[prefix] = found
    return options


def _artifact_bytes(
    layers: list[LayerKnobs],
    modules: dict[str, nn.Module],
    values: dict[str, Any],
    stored: dict[tuple[str, int, int], StoredWeights],
) -> int:
    """The group's weights' bytes in the artifact (``layer_bytes``), each layer quantized
    once per bit width (kept in ``stored``)."""
    settings = _size_settings(values)
    bits, nbytes = int(settings.pop("bits", 32)), 0
    cluster = int(settings.pop("cluster", 0))  # replaces bits where set
    for m in layers:
        layer, key = modules[m.name], (m.name, 0 if cluster else bits, cluster)
        if key not in stored:
            group, rows = m.settings["group_size"], m.settings["cluster_rows"]
            stored[key] = stored_weights(layer, bits, group, cluster, rows)
        nbytes += layer_bytes(layer, stored[key], **settings)
    return nbytes


def _size_settings(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in SIZE_KNOBS if k in values}


@dataclass(frozen=True)
class Candidate:
    """A knapsack plan: the fewest predicted bytes whose predicted distortion is within
    ``level``."""

    level: float
    plan: Plan
    distortion: float  # predicted: the sum of its groups'
    nbytes: int  # predicted bytes of the searched layers' weights
    latency: float | None = None  # predicted, as a fraction of the original's


SIZE_FIRST = 0.02
"""The weight of time in the size-first plans: among plans of equal bytes, the faster."""
SPEED_FIRST = 0.8
"""The weight of time in the speed-first plans (bytes keep the rest)."""


def candidate_plans(
    space: SearchSpace,
    table: SensitivityTable,
    model: nn.Module,
    levels: list[float],
    speed: float = SIZE_FIRST,
    options: dict[str, list[Option]] | None = None,
) -> list[Candidate]:
    """One plan per distortion level (fewer when two levels give the same plan), each the
    least ``(1 - speed) x bytes + speed x time`` (both as fractions of the original's)
    whose predicted distortion is within its level. ``options``: ``group_options``'s, when
    already at hand (they quantize every layer at every bit-width)."""
    options = group_options(space, table, model) if options is None else options
    found: list[Candidate] = []
    for level in levels:
        choice = _solve(options, level, speed, table.model_ms)
        params = {f"{prefix}.{k}": v for prefix, o in choice.items() for k, v in o.values.items()}
        plan = space.plan(params)
        if choice and all(plan != c.plan for c in found):
            harm = sum(o.distortion for o in choice.values())
            nbytes = sum(o.nbytes for o in choice.values())
            latency = table.predicted_latency(space, plan)
            found.append(Candidate(level, plan, harm, nbytes, latency))
    return found


LADDER_STEP = 8.0


def ladder(table: SensitivityTable, count: int, max_drop: float | None = None) -> list[float]:
    """``count`` distortion levels a factor of 8 apart (six span 4.5 decades), in the order
    to try them. Centred on where the probes place the metric budget (``budget_level``) and
    going out from it, safer side first; without that estimate, from the sum of each group's
    largest distortion down. Where the budget really falls is what the measured plans find
    out, and ``refined_levels`` fills in the step that crosses it."""
    worst: dict[str, float] = {}
    for key, d in table.distortions.items():
        group = _group_of(key)
        if math.isfinite(d) and d > 0:
            worst[group] = max(worst.get(group, 0.0), d)
    if not worst or count < 1:
        return []
    top = sum(worst.values())
    centre = budget_level(table, max_drop) if max_drop else None
    if centre is None:
        return [top / LADDER_STEP**i for i in range(count)]
    steps = [0] + [s for i in range(1, count) for s in (-i, i)]
    levels = [centre * LADDER_STEP**s for s in steps if centre * LADDER_STEP**s <= top * 2]
    return levels[:count]


def budget_level(table: SensitivityTable, max_drop: float) -> float | None:
    """The distortion at which the probes' own metric losses reach ``max_drop``: the median
    ratio of loss to distortion over the probes that lost any, applied to the budget (None
    with fewer than three such probes). Additive distortion under-counts interactions, so
    the truth tends to lie below it: the ladder tries the safer side next."""
    ratios = [
        table.drops[key] / d
        for key, d in table.distortions.items()
        if d > 0 and key in table.drops and table.drops[key] > 0
    ]
    if len(ratios) < 3:
        return None
    return max_drop / float(np.median(ratios))


def refined_levels(tried: list[tuple[float, bool]], count: int) -> list[float]:
    """Levels between the largest predicted distortion that met the metric budget and the
    smallest above it that did not (evenly in log); beyond the last that met it, or below
    the first that did not, when one side is missing. ``tried``: (level, met)."""
    met = [d for d, ok in tried if ok]
    missed = [d for d, ok in tried if not ok and (not met or d > max(met))]
    if count < 1 or not tried:
        return []
    if met and missed:
        low, high = max(met), min(missed)
    elif met:
        low, high = max(met), max(met) * 4.0 ** (count + 1)
    else:
        low, high = min(missed) / 4.0 ** (count + 1), min(missed)
    return [float(x) for x in np.geomspace(low, high, count + 2)[1:-1]]


def _solve(
    options: dict[str, list[Option]], level: float, speed: float, model_ms: float | None
) -> dict[str, Option]:
    """The multiple-choice knapsack, solved exactly (``scipy.optimize.milp``): one option
    per group, the least total cost whose total distortion is within ``level``; cost is
    ``(1 - speed)`` x its share of the original bytes plus ``speed`` x its change as a share
    of the original time. Exact, not the Lagrangian relaxation's convex hull: a group as
    large as MiniLM's word embeddings (half its bytes) leaves wide gaps between hull
    points, and the best plan within a level often lies in one. Below the least distortion
    any plan has, each group takes its least distorting option."""
    total_bytes = sum(max(o.nbytes for o in opts) for opts in options.values()) or 1
    time_weight = speed / model_ms if model_ms else 0.0
    kept = {g: _undominated(opts, speed, total_bytes, time_weight) for g, opts in options.items()}
    flat = [(g, o) for g, opts in kept.items() for o in opts]
    if not flat:
        return {}
    cost = np.array([_cost(o, speed, total_bytes, time_weight) for _, o in flat])
    harm = np.array([o.distortion for _, o in flat])
    if harm.sum() == 0 or sum(min(o.distortion for o in opts) for opts in kept.values()) > level:
        return {g: min(opts, key=lambda o: (o.distortion, o.nbytes)) for g, opts in kept.items()}
    groups = list(kept)
    member = np.zeros((len(groups), len(flat)))
    for j, (g, _) in enumerate(flat):
        member[groups.index(g), j] = 1
    with silenced(STDOUT):  # HiGHS prints debug lines from C++ (its issue #312)
        found = milp(
            cost,
            constraints=[
                LinearConstraint(member, 1, 1),
                LinearConstraint(harm[None, :], -np.inf, level),
            ],
            integrality=np.ones(len(flat)),
            bounds=Bounds(0, 1),
            options={"time_limit": 30.0, "mip_rel_gap": 1e-6},
        )
    chosen = (
        {} if found.x is None else {flat[j][0]: flat[j][1] for j in np.flatnonzero(found.x > 0.5)}
    )
    within = sum(o.distortion for o in chosen.values()) <= level * (1 + 1e-6) + 1e-12
    if len(chosen) != len(kept) or not within:  # none in time, or not a solution (HiGHS #312)
        return {g: min(opts, key=lambda o: (o.distortion, o.nbytes)) for g, opts in kept.items()}
    return chosen


def _cost(option: Option, speed: float, total_bytes: int, time_weight: float) -> float:
    return (1 - speed) * option.nbytes / total_bytes + time_weight * option.ms


def _undominated(
    options: list[Option], speed: float, total_bytes: int, time_weight: float
) -> list[Option]:
    """The options no other beats on both cost and distortion (the rest can never be
    chosen): MiniLM's 540 combinations per feed-forward layer shrink to a few dozen."""
    ranked = sorted(
        options, key=lambda o: (_cost(o, speed, total_bytes, time_weight), o.distortion)
    )
    kept: list[Option] = []
    for option in ranked:
        if not kept or option.distortion < kept[-1].distortion:
            kept.append(option)
    return kept


__all__ = [
    "BASE",
    "Candidate",
    "Probe",
    "SensitivityTable",
    "candidate_plans",
    "SIZE_FIRST",
    "SPEED_FIRST",
    "grid",
    "budget_level",
    "ladder",
    "refined_levels",
    "measure_sensitivity",
    "probe_plan",
    "probes_of",
    "shaped_space",
]
