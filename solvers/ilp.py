"""Integer programming: the multiple-choice knapsack with any number of budget constraints.

Binary x[u, k] = 1 when unit u takes option k; one option per unit; every budget constraint is linear in x;
minimize total damage. Three backends:

- ``cbc``   PuLP + its bundled CBC
- ``highs`` HiGHS through highspy (sparse arrays, solved in a spawned child process: see highs_worker)
- ``cpsat`` OR-Tools CP-SAT (integer coefficients: damage is scaled to 1e9 steps, float constraint costs
  are rounded up and limits down, so every plan it returns is feasible for the real costs)

``time_limit`` (seconds) bounds the whole solve, model building included: CoreDP's plan (exact unless its
state cap bites; its own bound gives the gap) is computed first as the incumbent (returned at once when it
is proven optimal), the backend gets the time that is left, and whichever plan is better when the time is
up is returned with its proven gap. A backend still running then is abandoned (HiGHS's process is killed;
CBC's and CP-SAT's runs end on their own time limit). So a time limit never ends in an exception when some
plan exists.

OR-Tools and highspy cannot share a process (HiGHS symbol clash). PuLP tries highspy on import, so
``_import`` loads OR-Tools first (PuLP then goes without highspy) and HiGHS runs in its own process.
"""

from __future__ import annotations

import importlib
import time
import warnings

import numpy as np

from mpsearch.core import InfeasibleBudgetError, MpsearchError
from mpsearch.core.params import Interval, OneOf
from solvers.base import Solver
from solvers.problem import SOLVER_RTOL, Problem, relative_gap

BACKENDS = ("cbc", "highs", "cpsat")
_OBJ_STEPS = 1e9
CBC_INCREMENT = 1e-12  # on the objective scaled to max damage 1


def _import(name: str):
    importlib.import_module("ortools.sat.python.cp_model")  # first, always: see module docstring
    return importlib.import_module(name)


def _infeasible():
    return InfeasibleBudgetError("no plan meets all constraints at once", "relax one of the constraints")


class ILP(Solver):
    """Exact integer program; see the module docstring for the backends."""

    exact = True  # proves optimality (status "optimal") when it returns one
    name = "ilp"

    _parameter_constraints = {
        "backend": [OneOf(BACKENDS)],
        "time_limit": [None, Interval(float, 0, open_low=True)],
        "msg": [bool],
    }

    def __init__(self, backend: str = "cbc", time_limit: float | None = None, msg: bool = False) -> None:
        self.backend = backend
        self.time_limit = time_limit
        self.msg = msg

    def _solve(self, problem: Problem):
        if self.backend not in BACKENDS:
            raise MpsearchError(f"unknown ILP backend {self.backend!r}", f"use one of {BACKENDS}")
        cols = np.argwhere(problem.valid)  # (n_vars, 2): unit, option
        if self.time_limit is None:
            return getattr(self, f"_solve_{self.backend}")(problem, cols, None)
        return self._solve_within(problem, cols, time.perf_counter() + self.time_limit)

    def _solve_within(self, problem: Problem, cols: np.ndarray, deadline: float):
        """The backend in a worker thread with the time left after the CoreDP incumbent; the better of the
        two plans when the deadline comes."""
        from concurrent.futures import ThreadPoolExecutor

        from solvers.core import CoreDP

        incumbent = CoreDP().solve(problem)  # raises InfeasibleBudgetError when no plan exists at all
        best = problem.choice_of(incumbent.plan)
        found = (best, incumbent.status, incumbent.gap)
        left = deadline - time.perf_counter()
        if left <= 0.05 or incumbent.status == "optimal":  # out of time, or nothing left to improve
            return found
        self._abandon = []  # cleanup callbacks of a backend run past the deadline
        pool = ThreadPoolExecutor(1)
        future = pool.submit(getattr(self, f"_solve_{self.backend}"), problem, cols, left * 0.8)
        try:
            choice, status, gap = future.result(timeout=max(deadline - time.perf_counter(), 0.0))
        except Exception:  # out of time (concurrent.futures.TimeoutError) or the backend failed: the incumbent stands
            for stop in self._abandon:
                stop()
            pool.shutdown(wait=False, cancel_futures=True)
            return found
        pool.shutdown(wait=False)
        incumbent_objective = problem.evaluate(best)[0]
        if problem.evaluate(choice)[0] < incumbent_objective - 1e-12 * abs(incumbent_objective):
            return choice, status, gap
        return found

    @staticmethod
    def _choice(problem: Problem, cols: np.ndarray, values) -> np.ndarray:
        choice = np.zeros(problem.n_units, dtype=int)
        on = np.asarray(values) > 0.5
        choice[cols[on, 0]] = cols[on, 1]
        return choice

    # ------------------------------------------------------------------ CBC
    def _solve_cbc(self, problem: Problem, cols: np.ndarray, limit: float | None):
        pulp = _import("pulp")
        damage = problem.damage[cols[:, 0], cols[:, 1]]
        norm = max(float(np.abs(damage).max()), 1e-300)  # scale the objective to O(1) for solver tolerances
        model = pulp.LpProblem("mpsearch", pulp.LpMinimize)
        x = [model.add_variable(f"x_{u}_{k}", 0, 1, cat="Binary") for u, k in cols]
        model += pulp.lpSum((d / norm) * var for d, var in zip(damage, x))
        by_unit: list[list] = [[] for _ in range(problem.n_units)]
        for (u, _), var in zip(cols, x):
            by_unit[u].append(var)
        for vars_u in by_unit:
            model += pulp.lpSum(vars_u) == 1
        for con, cost in zip(problem.constraints, problem.costs):
            c = cost[cols[:, 0], cols[:, 1]]
            cscale = max(float(np.abs(c).max()), 1e-300)
            model += pulp.lpSum((ci / cscale) * var for ci, var in zip(c, x)) <= con.limit / cscale
        with warnings.catch_warnings():
            # PuLP 3.x deprecates its bundled CBC in favour of the cbcbox package; the bundled one is what
            # installs everywhere here, so keep it (pyproject pins pulp < 4)
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = self._cbc_command(pulp, limit)
        model.solve(solver)
        status = pulp.LpStatus[model.status]
        if status == "Infeasible":
            raise _infeasible()
        if status not in ("Optimal", "Not Solved") or model.sol_status not in (1, 2):
            raise MpsearchError(f"CBC ended with status {status!r} and no plan", "raise time_limit")
        choice = self._choice(problem, cols, [v.value() or 0 for v in x])
        return (choice, "optimal", 0.0) if model.sol_status == 1 else (choice, "time_limit", float("nan"))

    def _cbc_command(self, pulp, limit: float | None = None):
        # "increment": CBC otherwise derives a cutoff increment and prunes nodes that are not better by it,
        # returning "optimal" plans up to 2e-4 worse than the optimum (measured at 500 layers)
        return pulp.PULP_CBC_CMD(msg=self.msg, timeLimit=limit, gapRel=1e-9, options=[f"increment {CBC_INCREMENT}"])

    # ------------------------------------------------------------------ HiGHS
    def _solve_highs(self, problem: Problem, cols: np.ndarray, limit: float | None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from solvers.highs_worker import solve_lp

        n_vars, n_units = len(cols), problem.n_units
        damage = problem.damage[cols[:, 0], cols[:, 1]]
        norm = max(float(np.abs(damage).max()), 1e-300)
        rows, vals = [cols[:, 0]], [np.ones(n_vars)]
        lower, upper = [np.ones(n_units)], [np.ones(n_units)]
        for j, (con, cost) in enumerate(zip(problem.constraints, problem.costs)):
            c = cost[cols[:, 0], cols[:, 1]]
            cscale = max(float(np.abs(c).max()), 1e-300)
            rows.append(np.full(n_vars, n_units + j))
            vals.append(c / cscale)
            lower.append([-np.inf])
            upper.append([con.limit / cscale])
        row_idx, values = np.concatenate(rows), np.concatenate(vals)
        col_idx = np.tile(np.arange(n_vars), len(rows))
        order = np.lexsort((row_idx, col_idx))
        arrays = {
            "cost": damage / norm,
            "row_lower": np.concatenate(lower).astype(float),
            "row_upper": np.concatenate(upper).astype(float),
            "start": np.searchsorted(col_idx[order], np.arange(n_vars + 1)).astype(np.int32),
            "index": row_idx[order].astype(np.int32),
            "value": values[order],
        }
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            # past the deadline, _solve_within kills the child (the executor keeps no public handle on it)
            getattr(self, "_abandon", []).append(lambda: [p.kill() for p in pool._processes.values()])
            out = pool.submit(solve_lp, arrays, limit, self.msg).result()
        if out["status"] == "infeasible":
            raise _infeasible()
        if out["x"] is None:
            raise MpsearchError(f"HiGHS ended with {out['status']!r} and no plan", "raise time_limit")
        choice = self._choice(problem, cols, out["x"])
        if out["status"] == "optimal":
            return choice, "optimal", 0.0
        return choice, "time_limit", out["gap"]

    # ------------------------------------------------------------------ CP-SAT
    def _solve_cpsat(self, problem: Problem, cols: np.ndarray, limit: float | None):
        cp_model = _import("ortools.sat.python.cp_model")
        damage = problem.damage[cols[:, 0], cols[:, 1]]
        shift = damage.min()
        span = max(float(damage.max() - shift), 1e-300)
        obj = np.round((damage - shift) / span * _OBJ_STEPS).astype(np.int64)
        model = cp_model.CpModel()
        x = [model.new_bool_var(f"x_{u}_{k}") for u, k in cols]
        by_unit: list[list] = [[] for _ in range(problem.n_units)]
        for (u, _), var in zip(cols, x):
            by_unit[u].append(var)
        for vars_u in by_unit:
            model.add_exactly_one(vars_u)
        for con, cost in zip(problem.constraints, problem.costs):
            c = cost[cols[:, 0], cols[:, 1]]
            ints = np.round(c)
            if np.all(np.abs(c - ints) <= 1e-9 * np.maximum(1, np.abs(c))) and c.max() < 2**52:
                coef, limit = ints.astype(np.int64), int(np.floor(con.limit * (1 + SOLVER_RTOL)))
            else:  # float costs: integer steps of max/1e9, costs up, limit down (stays feasible)
                step = float(np.abs(c).max()) / _OBJ_STEPS
                coef, limit = np.ceil(c / step).astype(np.int64), int(np.floor(con.limit / step))
            model.add(cp_model.LinearExpr.weighted_sum(x, coef.tolist()) <= limit)
        model.minimize(cp_model.LinearExpr.weighted_sum(x, obj.tolist()))
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 2
        solver.parameters.random_seed = 0
        if limit is not None:
            solver.parameters.max_time_in_seconds = float(limit)
        status = solver.solve(model)
        if status == cp_model.INFEASIBLE:
            raise _infeasible()
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            raise MpsearchError(f"CP-SAT ended with {solver.status_name(status)} and no plan", "raise time_limit")
        choice = self._choice(problem, cols, [solver.value(v) for v in x])
        if status == cp_model.OPTIMAL:
            return choice, "optimal", 0.0
        best, bound = solver.objective_value, solver.best_objective_bound
        return choice, "time_limit", relative_gap(best, bound)
