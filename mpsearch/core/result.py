"""SearchResult: what a solver returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mpsearch.core.plan import BitPlan

STATUSES = ("optimal", "feasible", "time_limit")


@dataclass
class ConstraintValue:
    name: str
    value: float
    limit: float

    @property
    def slack(self) -> float:
        return self.limit - self.value


@dataclass
class SearchResult:
    """plan, objective (total predicted damage), each constraint's value/limit/slack, status, gap, time."""

    plan: BitPlan
    objective: float
    constraints: dict[str, ConstraintValue]
    status: str
    gap: float = 0.0
    wall_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")

    def summary(self) -> dict:
        """JSON-ready facts (an unknown gap is None, not NaN)."""
        gap = None if math.isnan(self.gap) else self.gap
        out = {"status": self.status, "objective": self.objective, "gap": gap, "wall_time_s": self.wall_time_s}
        for c in self.constraints.values():
            out[c.name] = c.value
            out[f"{c.name}_slack"] = c.slack
        return out
