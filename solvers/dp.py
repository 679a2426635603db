"""Exact dynamic programming for the multiple-choice knapsack with one budget constraint.

The constraint costs are integerized. When every cost is an integer (bit counts are) and the budget in units
of the costs' greatest common divisor fits in ``max_buckets``, the DP is exact. Otherwise costs are scaled to
``min(max_buckets, max_cells / units)`` buckets: rounding them up gives a plan that is guaranteed feasible,
rounding them down gives a relaxation whose optimum is a lower bound; the reported ``gap`` is (upper - lower) / |upper|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from mpsearch.core import InfeasibleBudgetError, MpsearchError
from mpsearch.core.params import Interval
from solvers.base import Solver
from solvers.problem import SOLVER_RTOL, Problem, relative_gap


def _knapsack(damage: np.ndarray, weight: np.ndarray, capacity: int) -> tuple[np.ndarray | None, float]:
    """min sum damage[u, k_u] s.t. sum weight[u, k_u] <= capacity. weight: int >= 0, or -1 where unavailable."""
    best, choice = knapsack_table(damage, weight, capacity)
    if not np.isfinite(best[capacity]):
        return None, np.inf
    return backtrack(choice, weight, np.array([capacity]))[0], float(best[capacity])


def knapsack_table(damage: np.ndarray, weight: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """best[b] = min damage with total weight <= b, for every b; choice[u, b] = back-pointers."""
    n_units, n_opts = damage.shape
    best = np.zeros(capacity + 1)  # best[b]: min damage of the units so far with total weight <= b
    choice = np.zeros((n_units, capacity + 1), dtype=np.int8 if n_opts < 128 else np.int16)
    for u in range(n_units):
        new = np.full(capacity + 1, np.inf)
        for k in range(n_opts):
            w = int(weight[u, k])
            if w < 0 or w > capacity:
                continue
            cand = best[: capacity + 1 - w] + damage[u, k]
            better = cand < new[w:]
            new[w:][better] = cand[better]
            choice[u, w:][better] = k
        best = new
    return best, choice


def backtrack(choice: np.ndarray, weight: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """The plans behind best[b] for every b in ``budgets`` (one row per budget), all traced at once."""
    b = np.asarray(budgets, dtype=np.int64).copy()
    picks = np.zeros((len(b), choice.shape[0]), dtype=int)
    for u in range(choice.shape[0] - 1, -1, -1):
        picks[:, u] = choice[u, b]
        b = b - weight[u, picks[:, u]]
    return picks


def _as_integers(values: np.ndarray) -> np.ndarray | None:
    rounded = np.round(values)
    if np.all(np.abs(values - rounded) <= 1e-6 * np.maximum(1.0, np.abs(values))):
        return rounded.astype(np.int64)
    return None


@dataclass
class Integerized:
    """One constraint's costs as integer knapsack weights (relative to each unit's cheapest option).

    ``exact``: weights are the costs in units of their GCD. Otherwise ``up`` rounds scaled costs up (its plans
    are feasible) and ``down`` rounds them down (its optimum is a lower bound). -1 marks unavailable options.
    """

    up: np.ndarray
    down: np.ndarray
    capacity: int
    buckets: int
    exact: bool


def integerize(problem: Problem, max_buckets: int, max_cells: int) -> Integerized:
    valid = problem.valid
    bases, residuals = problem.residual_costs()
    residual = residuals[0]
    slack = problem.constraints[0].limit * (1 + SOLVER_RTOL) - bases[0].sum()
    buckets = max(1, min(max_buckets, max_cells // problem.n_units))
    ints = _as_integers(residual)
    if ints is not None:
        g = reduce(math.gcd, (int(v) for v in np.unique(ints[valid]) if v > 0), 0) or 1
        capacity = int(math.floor(slack / g + 1e-9))
        if capacity <= buckets:
            weight = np.where(valid, ints // g, -1)
            return Integerized(weight, weight, capacity, buckets, exact=True)
    scale = slack / buckets
    up = np.where(valid, np.ceil(residual / scale - 1e-9), -1).astype(np.int64)
    down = np.where(valid, np.floor(residual / scale + 1e-9), -1).astype(np.int64)
    return Integerized(up, down, buckets, buckets, exact=False)


class DP(Solver):
    """Exact DP on one constraint (any of avg_bits, size_bytes, bops, latency). Ties are honoured."""

    exact = True  # proves optimality (status "optimal") when it returns one
    name = "dp"

    _parameter_constraints = {"max_buckets": [Interval(int, 1)], "max_cells": [Interval(int, 1)]}

    def __init__(self, max_buckets: int = 1 << 20, max_cells: int = 1 << 28) -> None:
        self.max_buckets = max_buckets
        self.max_cells = max_cells  # bounds the back-pointer table (units x buckets bytes)

    def _solve(self, problem: Problem):
        if len(problem.constraints) != 1:
            names = [c.name for c in problem.constraints]
            raise MpsearchError(f"DP solves one constraint, the budget has {names}", "use solver 'ilp'")
        damage = np.where(problem.valid, problem.damage, np.inf)
        w = integerize(problem, self.max_buckets, self.max_cells)
        picks, upper = _knapsack(damage, w.up, w.capacity)
        if w.exact:
            if picks is None:
                raise InfeasibleBudgetError("no plan meets the budget", "raise the budget")
            return picks, "optimal", 0.0
        if picks is None:
            # rounding up made a barely-feasible budget look infeasible: say so rather than guess
            raise InfeasibleBudgetError(
                f"budget is within the DP resolution ({w.buckets} buckets) of the smallest plan",
                "raise the budget slightly, raise max_buckets, or use solver 'ilp'",
            )
        _, lower = _knapsack(damage, w.down, w.capacity)
        gap = relative_gap(upper, lower)
        return picks, ("optimal" if gap <= 1e-12 else "feasible"), gap
