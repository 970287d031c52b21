"""Each layer's sensitivity, learned before the search, and what the search does with it.

A probe applies one value of one knob to one layer (or tied group), everything else left as
it was, and judges the model on the first ``sensitivity.samples`` validation samples: no
artifact, no timing. The table of probes (metric lost per layer x knob x value) is kept on
the study, so a resumed or second driver reuses it. From it the search

- drops, per layer, values whose effect alone already passes the metric budget by a margin
  (``shaped_space``): random or TPE sampling in 50-100 dimensions otherwise almost always
  breaks some layer;
- solves a multiple-choice knapsack (``candidate_plans``): per layer, the choice that
  minimises predicted bytes + lambda x predicted metric loss, lambda swept so the predicted
  loss (the sum of the layers' losses) lands at several points across the budget. These
  plans are tried first, as HAWQ-V3, Sony MCT and ModelOpt's auto_quantize do once; the
  sampler then searches around them with real measurements.
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
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from torch import nn

from autosqueeze.codecs import FLOAT_BITS, TensorCodec, encoded_nbytes, quantize
from autosqueeze.measure import ProbeResult
from autosqueeze.plan import Plan
from autosqueeze.space import LayerKnobs, SearchSpace
from autosqueeze.techniques import technique_for
from autosqueeze.techniques.base import matrices
from autosqueeze.techniques.factorize import full_rank, rank_for

TABLE_FORMAT = 1
MAX_RANGE_PROBES = 10  # a range knob is probed at this many points at most
SIZE_KNOBS = ("bits", "prune", "rank")  # the knobs the size model prices (docs/search.md)


@dataclass(frozen=True)
class Probe:
    group: str  # a layer, or a tied group of layers: the space's parameter prefix
    knob: str
    value: Any

    @property
    def param(self) -> str:
        return f"{self.group}.{self.knob}"

    @property
    def key(self) -> str:
        return f"{self.param}={json.dumps(self.value)}"


BASE = "(base)"
"""The table key of the space's fixed choices alone (usually the original model)."""


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

    def done(self, key: str) -> bool:
        return key == BASE and self.base is not None or key in self.drops or key in self.failed

    def drop(self, probe: Probe) -> float:
        """The metric a probe lost (inf if it failed); a range value between two probed
        points is read off the line between them."""
        return _lookup(self.drops, self.failed, probe)

    def distortion(self, probe: Probe) -> float:
        return _lookup(self.distortions, self.failed, probe)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "samples": self.samples,
            "base": self.base,
            "drops": self.drops,
            "distortions": self.distortions,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, samples: int) -> SensitivityTable:
        """A stored table, or an empty one when none (or none readable) was stored for these
        samples: the study is someone's file, and a table that is not what this code writes
        is measured again rather than believed."""
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            return cls(samples)
        parts = [data.get(k) for k in ("drops", "distortions", "failed")]
        base, seconds = data.get("base"), data.get("seconds")
        if (
            data.get("samples") != samples
            or not all(isinstance(p, dict) for p in parts)
            or not (base is None or isinstance(base, (int, float)))
            or not isinstance(seconds, (int, float))
        ):
            return cls(samples)
        return cls(samples, base, *parts, seconds)

    def report(self, space: SearchSpace) -> dict[str, Any]:
        """What ``autosqueeze sensitivity --json`` prints."""
        return {
            "samples": self.samples,
            "base": self.base,
            "seconds": round(self.seconds, 3),
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
                "error": self.failed.get(p.key),
            }
            for p in probes_of(space)
        ]


def _lookup(values: dict[str, float], failed: dict[str, str], probe: Probe) -> float:
    if probe.key in values:
        return values[probe.key]
    if probe.key in failed:
        return math.inf
    known = sorted(
        (json.loads(key.partition("=")[2]), value)
        for key, value in values.items()
        if key.partition("=")[0] == probe.param
    )
    if not known or isinstance(probe.value, str):
        return math.inf
    xs, ys = zip(*known, strict=True)
    return float(np.interp(probe.value, xs, ys))


def probes_of(space: SearchSpace) -> list[Probe]:
    """Every searched (group, knob, value) but the value that leaves the layer alone."""
    seen: dict[str, LayerKnobs] = {}
    for layer in space.layers.values():
        seen.setdefault(layer.prefix, layer)
    return [
        Probe(layer.prefix, knob, value)
        for layer in seen.values()
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


def measure_sensitivity(
    space: SearchSpace,
    run: Callable[[dict[str, Plan]], Iterator[tuple[str, ProbeResult]]],
    table: SensitivityTable,
    save: Callable[[SensitivityTable], None],
    *,
    save_every_s: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
) -> SensitivityTable:
    """Run the probes ``table`` lacks through ``run`` (an executor's ``probes``), saving the
    table as results arrive (so an interrupted pass resumes where it stopped)."""
    wanted = {BASE: probe_plan(space, None)} | {
        p.key: probe_plan(space, p) for p in probes_of(space)
    }
    todo = {key: plan for key, plan in wanted.items() if not table.done(key)}
    results: dict[str, float] = {}
    start = last_save = time.monotonic()
    done = len(wanted) - len(todo)
    try:
        for key, got in run(todo):
            done += 1
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
            if progress:
                progress(done, len(wanted))
            if time.monotonic() - last_save > save_every_s:
                table.seconds += time.monotonic() - start
                start = last_save = time.monotonic()
                save(table)
    finally:
        table.seconds += time.monotonic() - start
        for name in ("drops", "distortions", "failed"):  # in model order, for the reports
            found = getattr(table, name)
            setattr(table, name, {k: found[k] for k in wanted if k in found})
        save(table)
    return table


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
            kept = {
                v
                for v in probe_values(dist)
                if (knob, v) in keep
                or _harmless(table, Probe(layer.prefix, knob, v), limit, max_distortion)
            }
            shaped = _shaped(dist, technique_for(knob).identity, kept)
            if isinstance(shaped, BaseDistribution):
                searched[knob] = shaped
            else:
                fixed[knob] = shaped
        layers[name] = replace(layer, searched=searched, fixed=fixed)
    return SearchSpace(layers)


def _harmless(
    table: SensitivityTable, probe: Probe, max_drop: float, max_distortion: float | None
) -> bool:
    if table.drop(probe) > max_drop:
        return False
    return max_distortion is None or table.distortion(probe) <= max_distortion


def _shaped(dist: BaseDistribution, identity: Any, kept: set) -> BaseDistribution | Any:
    """``dist`` keeping the identity and the ``kept`` values: a range keeps the stretch from
    the identity up to the first probed value not kept."""
    if isinstance(dist, CategoricalDistribution):
        choices = [c for c in dist.choices if c == identity or c in kept]
        return CategoricalDistribution(choices) if len(choices) > 1 else choices[0]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    reach = identity
    for value in sorted(probe_values(dist), key=lambda v: abs(v - identity)):
        if value != identity and value not in kept:
            break
        reach = value
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
    """One group's choice for the knapsack: its knob values, predicted distortion and bytes."""

    values: dict[str, Any]
    distortion: float
    nbytes: int


def group_options(
    space: SearchSpace, table: SensitivityTable, model: nn.Module
) -> dict[str, list[Option]]:
    """Per group, every combination of its size knobs' values (the rest left as they are),
    with the predicted distortion (the sum of its values' own, none below zero) and the
    predicted bytes of its weights (``layer_bytes``)."""
    modules = dict(model.named_modules())
    members: dict[str, list[LayerKnobs]] = {}
    for layer in space.layers.values():
        members.setdefault(layer.prefix, []).append(layer)
    options = {}
    zeros: dict[tuple[str, int], float] = {}
    for prefix, layers in members.items():
        knobs = {k: d for k, d in layers[0].searched.items() if k in SIZE_KNOBS}
        choices = {k: probe_values(d) for k, d in knobs.items()}
        found = []
        for combo in itertools.product(*choices.values()):
            values = dict(zip(choices, combo, strict=True))
            harm = sum(
                max(0.0, table.distortion(Probe(prefix, k, v)))
                for k, v in values.items()
                if v != technique_for(k).identity
            )
            if not math.isfinite(harm):
                continue
            settings = _size_settings({**layers[0].fixed, **values})
            nbytes = 0
            for m in layers:
                layer, bits = modules[m.name], int(settings.get("bits", 32))
                key = (m.name, bits)
                if key not in zeros:
                    zeros[key] = rounded_to_zero(layer, bits, m.group_size)
                nbytes += layer_bytes(layer, m.group_size, **settings, zeros=zeros[key])
            found.append(Option(values, harm, nbytes))
        if found:
            options[prefix] = found
    return options


def _size_settings(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in SIZE_KNOBS if k in values}


def layer_bytes(
    layer: nn.Module,
    group_size: int | None,
    bits: int = 32,
    prune: float = 0.0,
    rank: float = 1.0,
    zeros: float = 0.0,
) -> int:
    """Predicted bytes of a layer's weight in the artifact (``encoded_nbytes``), where
    ``zeros`` is the fraction of its weights quantization alone rounds to zero
    (``rounded_to_zero``). Pruning takes the smallest weights, which are those quantization
    zeroes too: the nonzeros are taken to be what the larger of the two leaves. Exact
    without pruning or factorization; with them, off by what quantization zeroes beyond
    the pruned weights (a few percent at 4 bits or more)."""
    codec = TensorCodec(int(bits), group_size if int(bits) < 16 else None)
    if rank < 1:  # the factors are other matrices: their own zeros are not known here
        out, inp = full_rank(layer)
        r = rank_for(layer, rank)
        shapes, zeros = [(r, inp), (out, r)], 0.0
    else:
        shapes = [tuple(m.shape) for m in matrices(layer).values()]
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        total += encoded_nbytes(shape, codec, n - max(round(prune * n), round(zeros * n)))
    return total


def rounded_to_zero(layer: nn.Module, bits: int, group_size: int | None) -> float:
    """The fraction of a layer's weights that quantizing to ``bits`` rounds to zero (with
    one scale per row, a row's outlier sends many of its small weights there)."""
    zero = total = 0
    for matrix in matrices(layer).values():
        weight = matrix.detach().cpu()
        if bits in FLOAT_BITS:  # tiny weights underflow in fp16
            q = weight.to(FLOAT_BITS[bits])
        else:
            q, _ = quantize(weight, bits, group_size)
        zero += q.numel() - int(torch.count_nonzero(q))
        total += q.numel()
    return zero / total if total else 0.0


@dataclass(frozen=True)
class Candidate:
    """A knapsack plan: the fewest predicted bytes whose predicted distortion is within
    ``level``."""

    level: float
    plan: Plan
    distortion: float  # predicted: the sum of its groups'
    nbytes: int  # predicted bytes of the searched layers' weights


def candidate_plans(
    space: SearchSpace, table: SensitivityTable, model: nn.Module, levels: list[float]
) -> list[Candidate]:
    """One plan per distortion level (fewer when two levels give the same plan)."""
    options = group_options(space, table, model)
    found: list[Candidate] = []
    for level in levels:
        choice = _solve(options, level)
        params = {f"{prefix}.{k}": v for prefix, o in choice.items() for k, v in o.values.items()}
        plan = space.plan(params)
        if choice and all(plan != c.plan for c in found):
            harm = sum(o.distortion for o in choice.values())
            nbytes = sum(o.nbytes for o in choice.values())
            found.append(Candidate(level, plan, harm, nbytes))
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
        group = key.partition("=")[0].rpartition(".")[0]
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


def _solve(options: dict[str, list[Option]], level: float) -> dict[str, Option]:
    """The Lagrangian relaxation of the multiple-choice knapsack: each group takes the option
    minimising bytes + lam * distortion, with the smallest lam (bisected in log space) whose
    total is within ``level``. It finds the plans on each group's lower convex hull, which
    is all an additive model can claim anyway, in milliseconds."""
    nbytes = {g: np.array([o.nbytes for o in opts], dtype=float) for g, opts in options.items()}
    harms = {g: np.array([o.distortion for o in opts]) for g, opts in options.items()}

    def pick(lam: float) -> dict[str, int]:
        return {g: int(np.argmin(nbytes[g] + lam * harms[g])) for g in options}

    def total(lam: float) -> float:
        return float(sum(harms[g][i] for g, i in pick(lam).items()))

    low = high = 1.0
    while total(low) <= level and low > 1e-30:
        low /= 10
    while total(high) > level and high < 1e30:
        high *= 10
    for _ in range(60):
        if high / low < 1.001:
            break
        middle = math.sqrt(low * high)
        low, high = (low, middle) if total(middle) <= level else (middle, high)
    return {g: options[g][i] for g, i in pick(high).items()}


__all__ = [
    "BASE",
    "Candidate",
    "Probe",
    "SensitivityTable",
    "candidate_plans",
    "grid",
    "budget_level",
    "ladder",
    "refined_levels",
    "rounded_to_zero",
    "layer_bytes",
    "measure_sensitivity",
    "probe_plan",
    "probes_of",
    "shaped_space",
]
