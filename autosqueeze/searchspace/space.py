"""The search space: which layers get which knobs, read from a YAML file and the model.

A space file holds ordered rules; each rule picks layers by type and name pattern and gives
the values its knobs may take. The first rule that matches a layer wins. Inspecting the model
turns the rules into named Optuna distributions, ``<layer>.<knob>``, and a trial's parameters
back into a Plan.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from autosqueeze.common.errors import UserError
from autosqueeze.compression.techniques import Site, Target, technique_for
from autosqueeze.plans.knob_facts import SETTINGS
from autosqueeze.plans.knobs import KnobValues, Range, contains, flat_values, nearest, values_of
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.searchspace.anatomy import anatomy
from autosqueeze.settings.config import file_problem
from autosqueeze.usercode.user_code import describe

if TYPE_CHECKING:
    from autosqueeze.problem.task import Task


class Rule(BaseModel):
    """Layers of these types whose names match these patterns get these knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    types: list[str] = Field(default=["Linear", "Conv1d", "Conv2d"], min_length=1)
    names: list[str] = ["*"]
    exclude: list[str] = []
    knobs: dict[str, KnobValues] = {}
    # the techniques' settings (``knob_facts.SETTINGS``), written beside ``knobs``
    settings: dict[str, Any] = {}
    name: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    share: str | None = None  # None: knobs per layer; "all": one set; a regex: one per match

    @model_validator(mode="before")
    @classmethod
    def _gather_settings(cls, data: Any) -> Any:
        """A rule writes its techniques' settings beside its knobs (``group_size: 64``)."""
        if isinstance(data, dict) and "settings" not in data:
            given = {k: v for k, v in data.items() if k in SETTINGS}
            data = {k: v for k, v in data.items() if k not in given} | {"settings": given}
        return data

    @field_validator("settings")
    @classmethod
    def _valid_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Each checked as its technique checks a plan's; those not given at their defaults."""
        for name, value in settings.items():
            if name not in SETTINGS:
                raise ValueError(f"{name!r} is not a setting; they are {', '.join(SETTINGS)}")
            SETTINGS[name].check(value)
        return {name: settings.get(name, s.default) for name, s in SETTINGS.items()}

    @field_validator("share")
    @classmethod
    def _valid_share(cls, share: str | None) -> str | None:
        if share not in (None, "all"):
            try:
                re.compile(share)
            except re.error as exc:
                raise ValueError(f"share: {share!r} is not a regular expression ({exc})") from None
        return share

    def group_of(self, index: int, layer: str) -> str:
        """The Optuna parameter prefix of a layer: its own name, or its group's."""
        label = self.name or f"rule{index}"
        if self.share is None:
            return layer
        if self.share == "all":
            return label
        match = re.search(self.share, layer)
        if match is None:
            return layer
        return f"{label}[{match.group(1) if match.groups() else match.group(0)}]"

    @model_validator(mode="after")
    def _two_of_four_halves(self) -> Rule:
        """2:4 pruning zeroes exactly half a layer's weights: prune is 0 or 0.5."""
        values = self.knobs.get("prune")
        if self.settings["prune_by"] == "2:4" and values is not None:
            if isinstance(values, Range) or not set(flat_values(values)) <= {0, 0.5}:
                raise ValueError("prune_by 2:4 zeroes half the weights: list prune as [0, 0.5]")
        return self

    @field_validator("types")
    @classmethod
    def _valid_types(cls, types: list[str]) -> list[str]:
        for name in types:
            if not name.isidentifier():
                raise ValueError(f"{name!r} is not a class name")
        return types

    @field_validator("knobs")
    @classmethod
    def _known_knobs(cls, knobs: dict[str, KnobValues]) -> dict[str, KnobValues]:
        for name, values in knobs.items():
            technique_for(name).validate(values)  # raises ValueError naming the problem
        return knobs


class SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rules: list[Rule] = Field(min_length=1)


@dataclass(frozen=True)
class LayerKnobs:
    """The knobs one layer offers: searched distributions and fixed values."""

    name: str
    searched: dict[str, BaseDistribution]
    fixed: dict[str, Any]
    settings: dict[str, Any]  # what its rule sets for every plan of the layer, beside the knobs
    key: str = ""  # the Optuna parameter prefix: the layer's name, or its shared group's

    @property
    def prefix(self) -> str:
        return self.key or self.name


BASE = "base"  # the parameter choosing the model a plan compresses, with model.candidates
ORIGINAL = "original"  # its value for the original model


@dataclass(frozen=True)
class SearchSpace:
    layers: dict[str, LayerKnobs]
    # layer -> why some of its rule's knobs are not offered (tied, read from outside, failed)
    withheld: dict[str, str] = field(default_factory=dict)
    # ``model.candidates``: each student's own space, from the same rules
    students: dict[str, SearchSpace] = field(default_factory=dict)
    runtime: str = "torch"  # where the model ships (``budgets.runtime``): what a byte costs

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        """Every searched knob, named ``<layer>.<knob>`` (or ``<group>.<knob>`` when layers
        share knobs), in model order; first, with students, ``base``: which model."""
        base = {BASE: CategoricalDistribution([ORIGINAL, *self.students])} if self.students else {}
        return base | {
            f"{layer.prefix}.{knob}": dist
            for layer in self.layers.values()
            for knob, dist in layer.searched.items()
        }

    def plan(self, params: dict[str, Any]) -> Plan:
        """The plan for a trial's parameters; knobs not in ``params`` take their fixed value.
        A student's layer takes the value sampled for the original's layer of its name (the
        nearest it offers), so one set of parameters serves every base model; the student's
        layers the original lacks are left as they are."""
        base = params.get(BASE, ORIGINAL)
        if base != ORIGINAL:
            return self.students[base]._plan_of(params, base)
        return self._plan_of(params, "")

    def _plan_of(self, params: dict[str, Any], base: str) -> Plan:
        """This space's plan for ``params``; a student's (``base``) snapped to its values."""
        layers = {}
        for layer in self.layers.values():
            values = dict(layer.fixed)
            for knob, dist in layer.searched.items():
                key = f"{layer.prefix}.{knob}"
                if key in params:
                    value = params[key]
                    snap = base and not contains(dist, value)
                    values[knob] = nearest(dist, value) if snap else value
            layers[layer.name] = LayerPlan.of(**layer.settings, **values)
        return Plan(layers, base)

    def uniform_plan(self, **choices: Any) -> Plan:
        """One choice for every layer in the space (e.g. ``bits=8``), others untouched."""
        return Plan(
            {name: LayerPlan.of(**k.settings, **choices) for name, k in self.layers.items()}
        )

    def params_for(self, plan: Plan) -> dict[str, Any] | None:
        """The trial parameters that give ``plan`` (of the original), or None when the space
        cannot express it."""
        if plan.base:
            return None
        params: dict[str, Any] = {BASE: ORIGINAL} if self.students else {}
        for layer in self.layers.values():
            lp = plan.layers.get(layer.name, LayerPlan(**layer.settings))
            for knob, dist in layer.searched.items():
                key, value = f"{layer.prefix}.{knob}", getattr(lp, knob)
                if not contains(dist, value) or params.get(key, value) != value:
                    return None  # out of range, or tied layers that the plan sets apart
                params[key] = value
        wanted = {name: plan.layers.get(name, LayerPlan()) for name in self.layers}
        return params if self.plan(params).layers == wanted else None

    def nearest_params(self, **choices: Any) -> dict[str, Any]:
        """The trial parameters closest to a uniform plan of the original: each knob takes the
        offered value nearest to ``choices`` (or to leaving the layer alone, for knobs not
        named)."""
        base = {BASE: ORIGINAL} if self.students else {}
        return base | {
            f"{layer.prefix}.{knob}": nearest(dist, choices.get(knob, technique_for(knob).identity))
            for layer in self.layers.values()
            for knob, dist in layer.searched.items()
        }

    def most_compressed_plan(self) -> Plan:
        """Each knob at its most aggressive value: a floor on the size the space can reach."""
        layers = {}
        for layer in self.layers.values():
            values = dict(layer.fixed)
            for knob, dist in layer.searched.items():
                values[knob] = technique_for(knob).most_compressed(values_of(dist))
            layers[layer.name] = LayerPlan.of(**layer.settings, **values)
        return Plan(layers)


@dataclass(frozen=True)
class LayerCoverage:
    """One module holding parameters of its own, and what the space does with them."""

    name: str
    kind: str  # its class name
    parameters: int  # its own parameters; a tied weight counts at its first holder only
    knobs: tuple[str, ...]  # offered knobs, empty when none
    why: str  # why not more (or none): withheld knobs, no rule, a norm kept fp32


def coverage(model: nn.Module, space: SearchSpace) -> list[LayerCoverage]:
    """Every module with parameters of its own, in model order: what ``validate`` prints so a
    user sees which weights the search can compress and why the others cannot be."""
    rows = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module._parameters.values() if p is not None]
        fresh = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in own)
        if not own:
            continue
        layer = space.layers.get(name)
        knobs = tuple(sorted({*layer.searched, *layer.fixed})) if layer else ()
        why = space.withheld.get(name, "")
        if not layer and not why:
            why = _unmatched(module)
        rows.append(
            LayerCoverage(
                name or "(model)", type(module).__name__, sum(p.numel() for p in fresh), knobs, why
            )
        )
    return rows


def _unmatched(module: nn.Module) -> str:
    """Why a module with parameters of its own got no knobs though no technique refused it."""
    if "Norm" in type(module).__name__:
        return "kept fp32 by design (a norm)"
    if list(module.children()):  # parameters held beside its layers: a position embedding
        bare = ", ".join(k for k, p in module._parameters.items() if p is not None)
        return f"stored fp32: its own parameters ({bare[:60]}) are not a layer's, no rule names it"
    return "no rule of the space matches it"


def load_space_file(path: Path) -> SpaceFile:
    if not path.is_file():
        raise UserError(f"space: file {path} {file_problem(path)}.")
    try:
        raw = yaml.safe_load(path.read_text())
        return SpaceFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"space file {path} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"'{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"space file {path} is not valid: {problems}.") from None


def build_space(
    model: nn.Module, spec: SpaceFile | Path, target: Target | None = None
) -> SearchSpace:
    """Match the rules against the model's layers and offer each layer the knobs that apply
    on ``target`` (kernels depend on its device; structured pruning traces its example input)."""
    target = target or Target()
    if isinstance(spec, Path):
        spec = load_space_file(spec)
    _check_types(spec, model)
    layers: dict[str, LayerKnobs] = {}
    withheld: dict[str, str] = {}
    failed: list[str] = []
    matched = [
        (name, module, rule)
        for name, module in model.named_modules()
        if (rule := next((r for r in spec.rules if _matches(r, name, module)), None))
    ]
    weighted = [
        n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
    ]
    facts = anatomy(model, weighted, target.example_input)
    for name, module, rule in matched:
        holders = facts.tied.get(name, (name,))
        owner = next((h for h in holders if h in layers), None)
        if owner is not None:  # a tied weight is one unit: its first layer's choices are its own
            withheld[name] = f"its weight is {owner}'s, searched there"
            continue
        stay = facts.must_stay(name)
        searched: dict[str, BaseDistribution] = {}
        fixed: dict[str, Any] = {}
        for knob, values in rule.knobs.items():
            technique = technique_for(knob)
            if stay and not technique.keeps_layer:
                withheld[name] = f"{withheld[name]}, {knob}" if name in withheld else knob
                continue
            site = Site(name, module, model, target)
            try:
                offered = technique.offer(site, values)
            except Exception as exc:  # noqa: BLE001 - a third-party analysis failed on this layer
                failed.append(f"{knob}: {describe(exc)}")
                continue
            off = all(v == technique.identity for v in flat_values(values))  # separable: 0
            if offered is None and not off and (why := technique.why_not(site)):
                failed.append(f"{knob}: {why}")
            if isinstance(offered, BaseDistribution):
                searched[knob] = offered
            elif offered is not None:
                fixed[knob] = offered
        if name in withheld:
            withheld[name] = f"{withheld[name]} not offered: {stay}"
        if failed:
            why = "; ".join(failed)
            withheld[name] = f"{withheld[name]}; {why}" if name in withheld else why
            failed.clear()
        if searched or fixed:
            key = rule.group_of(spec.rules.index(rule), name)
            layers[name] = LayerKnobs(name, searched, fixed, rule.settings, key)
    if not layers:
        raise UserError(
            "space: no layer of the model matches any rule of the space file; "
            f"the model's layer types are {_layer_types(model)}."
        )
    return SearchSpace(_tie(layers), withheld, runtime=target.runtime)


def study_space(task: Task) -> SearchSpace:
    """A study's space: the original model's, and each ``model.candidates`` student's from
    the same rules (a UserError naming the student whose layers none of them matches)."""
    spec = load_space_file(task.config.space)
    students = {}
    for name in task.candidates:
        try:
            students[name] = build_space(task.skeleton(name), spec, task.target)
        except UserError as exc:
            raise UserError(f"model.candidates.{name}: {exc}") from None
    return replace(build_space(task.model, spec, task.target), students=students)


def _tie(layers: dict[str, LayerKnobs]) -> dict[str, LayerKnobs]:
    """Layers of one group get one set of distributions: what every member can take
    (e.g. the ranks that save parameters in all of them)."""
    groups: dict[str, list[LayerKnobs]] = {}
    for layer in layers.values():
        groups.setdefault(layer.prefix, []).append(layer)
    tied = dict(layers)
    for members in groups.values():
        if len(members) < 2:
            continue
        shared: dict[str, BaseDistribution] = {}
        for knob in set.intersection(*(set(m.searched) for m in members)):
            dists = [m.searched[knob] for m in members]
            lists = [d for d in dists if isinstance(d, CategoricalDistribution)]
            if all(d == dists[0] for d in dists):
                shared[knob] = dists[0]
            elif len(lists) == len(dists):  # all categorical
                common = [c for c in lists[0].choices if all(c in d.choices for d in lists)]
                if len(common) > 1:
                    shared[knob] = CategoricalDistribution(common)
        for m in members:
            tied[m.name] = replace(m, searched={k: v for k, v in shared.items()})
    return tied


def _matches(rule: Rule, name: str, module: nn.Module) -> bool:
    """A rule's types are class names: a torch.nn type matches its subclasses; any other
    name (Hugging Face's ``Conv1D``) matches a class of that name in the layer's ancestry."""
    classes = {c.__name__ for c in type(module).__mro__}
    if not name or not any(t in classes for t in rule.types):
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in rule.names) and not any(
        fnmatch.fnmatchcase(name, p) for p in rule.exclude
    )


def _check_types(spec: SpaceFile, model: nn.Module) -> None:
    """A rule none of whose types is torch.nn's or a class in the model has a typo; one that
    also names another library's class (``[Linear, Conv1D]``) fits models with either."""
    present = {c.__name__ for m in model.modules() for c in type(m).__mro__}
    for index, rule in enumerate(spec.rules):
        known = [t for t in rule.types if isinstance(getattr(nn, t, None), type) or t in present]
        if not known:
            raise UserError(
                f"space: rules[{index}].types: {', '.join(map(repr, rule.types))} is neither a "
                "torch.nn layer type nor a class in the model; the model's layer types are "
                f"{_layer_types(model)}."
            )


def _layer_types(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if not list(m.children())})


__all__ = [
    "BASE",
    "ORIGINAL",
    "LayerCoverage",
    "LayerKnobs",
    "SearchSpace",
    "SpaceFile",
    "build_space",
    "coverage",
    "load_space_file",
    "study_space",
]
