"""Declarative parameter validation shared by estimators, solvers and the Pareto front (scikit-learn style).

Constructors store their arguments verbatim; ``_parameter_constraints`` says what each one may be, and
``validate_params()`` checks them all before any work is done, with one message template:
"<component> <name>: parameter <p> must be <what>, got <value>; <fix>". ``build(cls, **params)`` also turns
an unknown keyword into the same kind of one-line error naming the parameters that exist.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

from mpsearch.core.errors import MpsearchError


@dataclass(frozen=True)
class Interval:
    """A number of ``kind`` (int or float) in [low, high]; ``None`` leaves a side open."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.open_low else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {self.low}"
        return f"{what} <= {self.high}" if self.high is not None else what


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (usually strings)."""

    values: tuple

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str | int | float | bool | type(None)) and value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


def _accepts(spec: Any, value: Any) -> bool:
    if spec is None:
        return value is None
    if spec is bool:
        return isinstance(value, bool)
    if spec == "callable":
        return callable(value)
    if isinstance(spec, type):
        return isinstance(value, spec) and not (spec is not bool and isinstance(value, bool))
    return spec.accepts(value)


def _describe(spec: Any) -> str:
    if spec is None:
        return "None"
    if spec == "callable":
        return "a callable"
    if isinstance(spec, type):
        return {bool: "True or False", str: "a string", dict: "a dict"}.get(spec, f"a {spec.__name__}")
    return spec.describe()


class Configurable:
    """Base of every configurable component: stored constructor arguments, ``get_params``, validation."""

    component: ClassVar[str] = "component"  # "estimator", "solver"... (for messages)
    name: str = "component"
    _parameter_constraints: ClassVar[dict[str, list]] = {}

    @classmethod
    def required_params(cls) -> list[str]:
        """Constructor parameters without a default (``build`` refuses to go on without them)."""
        if cls.__init__ is object.__init__:
            return []
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name in cls.param_names() and p.default is inspect.Parameter.empty]

    @classmethod
    def param_names(cls) -> list[str]:
        if cls.__init__ is object.__init__:
            return []
        kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self" and p.kind not in kinds]

    def get_params(self) -> dict:
        return {p: getattr(self, p) for p in self.param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def validate_params(self) -> None:
        """Check every constrained parameter; raise MpsearchError on the first that breaks its constraint."""
        for param, specs in self._parameter_constraints.items():
            value = getattr(self, param)
            if not any(_accepts(s, value) for s in specs):
                allowed = " or ".join(_describe(s) for s in specs)
                raise MpsearchError(
                    f"{self.component} {self.name!r}: parameter {param!r} must be {allowed}, got {value!r}",
                    f"pass a valid {param}=",
                )
        self._validate_more()

    def _validate_more(self) -> None:
        """Cross-parameter checks (e.g. min <= max); subclasses override."""


def build(cls: type[Configurable], **params) -> Configurable:
    """Instantiate and validate, turning unknown keywords into a one-line MpsearchError."""
    known = cls.param_names()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise MpsearchError(
            f"{cls.component} {cls.name!r} has no parameter {', '.join(map(repr, unknown))}",
            f"its parameters are {', '.join(known) or '(none)'}",
        )
    missing = [p for p in cls.required_params() if p not in params]
    if missing:
        hint = (
            " (e.g. mpsearch.fitness.PlanFitness(model, data); search() gives it one)" if "fitness" in missing else ""
        )
        raise MpsearchError(
            f"{cls.component} {cls.name!r} needs parameter {', '.join(map(repr, missing))}",
            f"pass {', '.join(f'{p}=...' for p in missing)}{hint}",
        )
    obj = cls(**params)
    obj.validate_params()
    return obj
