"""Exhaustive search: the oracle that exact solvers are tested against (small problems only)."""

from __future__ import annotations

import itertools

import numpy as np

from mpsearch.core import InfeasibleBudgetError, MpsearchError
from mpsearch.core.params import Interval
from solvers.base import Solver
from solvers.problem import Problem


class BruteForce(Solver):
    """Enumerate every plan. ``max_plans`` guards against accidental use on large problems."""

    exact = True  # proves optimality (status "optimal") when it returns one
    name = "bruteforce"

    _parameter_constraints = {"max_plans": [Interval(int, 1)]}

    def __init__(self, max_plans: int = 2_000_000) -> None:
        self.max_plans = max_plans

    def _solve(self, problem: Problem):
        counts = problem.valid.sum(axis=1)
        n_plans = int(np.prod(counts.astype(float)))
        if n_plans > self.max_plans:
            raise MpsearchError(f"brute force would try {n_plans} plans", "use solver 'dp' or 'ilp'")
        best, best_obj = None, np.inf
        for combo in itertools.product(*(range(c) for c in counts)):
            choice = np.array(combo)
            if problem.is_feasible(choice):
                obj, _ = problem.evaluate(choice)
                if obj < best_obj:
                    best, best_obj = choice, obj
        if best is None:
            raise InfeasibleBudgetError("no plan meets all constraints at once", "relax one of the constraints")
        return best, "optimal", 0.0
