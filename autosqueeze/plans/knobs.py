"""Knob values as written in a space file, and their Optuna distributions."""

from __future__ import annotations

from typing import Any, cast

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from pydantic import BaseModel, ConfigDict


class Range(BaseModel):
    """``{low, high, step?, log?}``: a numeric range (an int range when all are integers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float
    high: float
    step: float | None = None
    log: bool = False


KnobValues = list[float | str] | Range | float | str
"""A list (categorical), a range, or a single value (fixed, not searched); numbers for most
knobs, names for ``kernel``."""


def to_distribution(values: KnobValues) -> BaseDistribution | float | str:
    if isinstance(values, Range):
        if all(float(v).is_integer() for v in (values.low, values.high, values.step or 1)):
            return IntDistribution(int(values.low), int(values.high), step=int(values.step or 1))
        return FloatDistribution(values.low, values.high, step=values.step, log=values.log)
    if isinstance(values, list):
        choices = tuple(dict.fromkeys(_number(v) for v in values))
        return CategoricalDistribution(choices) if len(choices) > 1 else choices[0]
    return _number(values)


def flat_values(values: KnobValues) -> list[float | str]:
    """The extreme values a knob spec can take, for validation."""
    if isinstance(values, Range):
        return [values.low, values.high]
    return list(values) if isinstance(values, list) else [values]


def listed_numbers(values: KnobValues) -> list[float]:
    """The values of a numeric knob searched only as a choice (``Technique.listed``), one value
    as a list of one: ``Technique.validate`` refused a range or a name."""
    listed = values if isinstance(values, list) else [values]
    numbers = [v for v in listed if isinstance(v, (int, float))]
    if len(numbers) != len(listed):
        raise ValueError(f"a list of numbers is wanted, got {values!r}")
    return numbers


def values_of(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    return [dist.low, dist.high]


def contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    return dist.low <= value <= dist.high


def nearest(dist: BaseDistribution, target: float | str) -> Any:
    """The value ``dist`` offers that is closest to ``target`` (first on ties)."""
    if isinstance(dist, CategoricalDistribution):
        if isinstance(target, str) or any(isinstance(c, str) for c in dist.choices):
            return target if target in dist.choices else dist.choices[0]
        return min(dist.choices, key=lambda c: abs(float(cast(float, c)) - target))
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    if isinstance(target, str):
        raise TypeError(f"a numeric knob's value is a number, got {target!r}")
    value = min(max(target, dist.low), dist.high)
    if dist.step:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
    return type(dist.low)(value)


def _number(value: float | str) -> int | float | str:
    if isinstance(value, str):
        return value
    return int(value) if float(value).is_integer() else float(value)
