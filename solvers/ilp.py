"""Integer programming: multiple-choice knapsack with any number of constraints, solved by PuLP + CBC."""

from __future__ import annotations

import warnings

import numpy as np

from mpsearch.core import InfeasibleBudgetError, MpsearchError
from solvers.base import Solver
from solvers.problem import Problem

BACKENDS = ("cbc",)


class ILP(Solver):
    """Binary x[u,k]: one option per unit; every budget constraint linear in x; minimize total damage.

    ``time_limit`` (seconds) makes CBC return the best plan found so far with status ``time_limit``.
    """

    name = "ilp"

    def __init__(self, backend: str = "cbc", time_limit: float | None = None, msg: bool = False) -> None:
        self.backend = backend
        self.time_limit = time_limit
        self.msg = msg

    def _solve(self, problem: Problem):
        if self.backend not in BACKENDS:
            raise MpsearchError(f"unknown ILP backend {self.backend!r}", f"use one of {BACKENDS}")
        import pulp  # lazy: keeps `import solvers` light

        damage = problem.damage
        finite = damage[problem.valid]
        norm = max(float(np.abs(finite).max()), 1e-300)  # scale the objective to O(1) for solver tolerances
        model = pulp.LpProblem("mpsearch", pulp.LpMinimize)
        x = {
            (u, k): model.add_variable(f"x_{u}_{k}", 0, 1, cat="Binary")
            for u in range(problem.n_units)
            for k in range(damage.shape[1])
            if problem.valid[u, k]
        }
        model += pulp.lpSum((damage[u, k] / norm) * var for (u, k), var in x.items())
        for u in range(problem.n_units):
            model += pulp.lpSum(x[u, k] for k in range(damage.shape[1]) if (u, k) in x) == 1
        for con, cost in zip(problem.constraints, problem.costs):
            cscale = max(float(np.abs(cost[problem.valid]).max()), 1e-300)
            model += pulp.lpSum((cost[u, k] / cscale) * var for (u, k), var in x.items()) <= con.limit / cscale
        with warnings.catch_warnings():
            # PuLP 3.x deprecates its bundled CBC in favour of the cbcbox package; the bundled one is what
            # installs everywhere here, so keep it (pyproject pins pulp < 4)
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=self.msg, timeLimit=self.time_limit)
        model.solve(solver)
        status = pulp.LpStatus[model.status]
        if status == "Infeasible":
            raise InfeasibleBudgetError("no plan meets all constraints at once", "relax one of the constraints")
        if status not in ("Optimal", "Not Solved") or model.sol_status not in (1, 2):
            raise MpsearchError(f"CBC ended with status {status!r} and no plan", "raise time_limit")
        choice = np.zeros(problem.n_units, dtype=int)
        for (u, k), var in x.items():
            if var.value() is not None and var.value() > 0.5:
                choice[u] = k
        if model.sol_status == 1:
            return choice, "optimal", 0.0
        return choice, "time_limit", float("nan")
