"""Core types. Imports numpy and pandas only: never torch, sensitivity or solvers."""

from mpsearch.core.budget import Budget, Constraint
from mpsearch.core.errors import (
    InfeasibleBudgetError,
    InvalidOptionError,
    InvalidPlanError,
    InvalidTableError,
    MpsearchError,
    UnknownModelError,
)
from mpsearch.core.options import DEFAULT_OPTIONS, Option, parse_option, parse_options
from mpsearch.core.pareto import ParetoFront
from mpsearch.core.plan import BitPlan
from mpsearch.core.result import ConstraintValue, SearchResult
from mpsearch.core.table import CostTable, LayerInfo, cost_rows

__all__ = [
    "BitPlan",
    "Budget",
    "Constraint",
    "ConstraintValue",
    "CostTable",
    "DEFAULT_OPTIONS",
    "InfeasibleBudgetError",
    "InvalidOptionError",
    "InvalidPlanError",
    "InvalidTableError",
    "LayerInfo",
    "MpsearchError",
    "ParetoFront",
    "Option",
    "SearchResult",
    "UnknownModelError",
    "cost_rows",
    "parse_option",
    "parse_options",
]
