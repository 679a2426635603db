"""Exact damage-vs-cost Pareto fronts, with the plan for every point."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mpsearch.core import MpsearchError
from mpsearch.core.params import Configurable, Interval
from mpsearch.core.pareto import ParetoFront
from solvers.core import Arrays, relax, search_core
from solvers.dp import backtrack, integerize, knapsack_table
from solvers.lagrange import Hull
from solvers.problem import SOLVER_RTOL, Problem


class Pareto(Configurable):
    """Front over the problem's budget axes (one or two), for costs up to the budget's limits.

    ``budgets=None`` (default): the complete front, every non-dominated point. One axis: one DP pass over
    integerized costs (exact when costs are integers and the range fits ``max_buckets`` units of their GCD;
    otherwise costs are rounded up to ``max_buckets`` buckets and ``meta['exact']`` is False). Two axes:
    Nemhauser-Ullmann merging of per-unit options with dominance pruning (exact; at most ``max_points``).

    ``budgets=N`` (one axis; for large problems, whose complete front can hold 1e5+ points): the optimum at
    N evenly spaced budgets, each solved exactly by :class:`~solvers.core.CoreDP`, plus every vertex of the
    front's convex hull (optimal for its own budget by the LP relaxation). Every point is on the exact front
    (``meta['exact']``); points between them are not listed (``meta['complete']`` is False).
    """

    component = "solver"
    name = "pareto"
    _parameter_constraints = {
        "budgets": [None, Interval(int, 2)],
        "max_buckets": [Interval(int, 1)],
        "max_cells": [Interval(int, 1)],
        "max_points": [Interval(int, 1)],
    }

    def __init__(
        self,
        budgets: int | None = None,
        max_buckets: int = 1 << 20,
        max_cells: int = 1 << 28,
        max_points: int = 200_000,
    ) -> None:
        self.budgets = budgets
        self.max_buckets = max_buckets
        self.max_cells = max_cells
        self.max_points = max_points

    def solve(self, problem: Problem) -> ParetoFront:
        self.validate_params()
        if self.budgets is not None:
            if len(problem.constraints) != 1:
                raise MpsearchError("Pareto(budgets=N) samples one cost axis", "give one budget constraint")
            return self._front(problem, sampled_front(problem, self.budgets), True, complete=False)
        if len(problem.constraints) == 1:
            choices, exact = self._one_axis(problem)
        elif len(problem.constraints) == 2:
            choices, exact = self._two_axes(problem), True
        else:
            raise MpsearchError("Pareto fronts have one or two cost axes", "give one or two budget constraints")
        return self._front(problem, choices, exact)

    def _one_axis(self, problem: Problem):
        w = integerize(problem, self.max_buckets, self.max_cells)
        best, choice = knapsack_table(np.where(problem.valid, problem.damage, np.inf), w.up, w.capacity)
        steps = np.flatnonzero(np.isfinite(best) & np.concatenate([[True], best[1:] < best[:-1]]))
        return backtrack(choice, w.up, steps), w.exact

    def _two_axes(self, problem: Problem) -> np.ndarray:
        c1, c2, dmg = problem.costs[0], problem.costs[1], problem.damage
        pts = np.zeros((1, 3))  # c1, c2, damage of partial plans
        plans = np.zeros((1, 0), dtype=int)
        for u in range(problem.n_units):
            ks = np.flatnonzero(problem.valid[u])
            cand = (pts[:, None, :] + np.stack([c1[u, ks], c2[u, ks], dmg[u, ks]], 1)[None]).reshape(-1, 3)
            cand_plans = np.concatenate([np.repeat(plans, len(ks), 0), np.tile(ks, len(pts))[:, None]], axis=1)
            keep = _nondominated(cand)
            pts, plans = cand[keep], cand_plans[keep]
            if len(pts) > self.max_points:
                raise MpsearchError(
                    f"the two-axis front exceeds {self.max_points} points", "raise max_points or use one axis"
                )
        limits = problem.limits()
        ok = (pts[:, 0] <= limits[0] * (1 + SOLVER_RTOL)) & (pts[:, 1] <= limits[1] * (1 + SOLVER_RTOL))
        return plans[ok]

    def _front(self, problem: Problem, choices: np.ndarray, exact: bool, complete: bool = True) -> ParetoFront:
        names = [c.name for c in problem.constraints]
        units = np.arange(problem.n_units)
        damage = problem.damage[units, choices].sum(axis=1)
        totals = [c[units, choices].sum(axis=1) for c in problem.costs]
        frame = pd.DataFrame({n: con.report(t) for n, con, t in zip(names, problem.constraints, totals)})
        frame["damage"] = damage
        keep = _nondominated(frame[[*names, "damage"]].to_numpy())
        frame, choices = frame[keep], choices[keep]
        order = np.lexsort((frame["damage"].to_numpy(), frame[names[0]].to_numpy()))
        frame, choices = frame.iloc[order].reset_index(drop=True), choices[order]
        frame.insert(0, "plan_id", np.arange(len(frame)))
        plans = _LazyPlans(problem, choices, "optimal" if exact else "feasible", self.name)
        meta = {
            "exact": exact,
            "complete": complete,
            "table_fingerprint": problem.table_fingerprint,
            "estimator": problem.table.meta.get("estimator"),
        }
        return ParetoFront(frame, plans, names, meta)


def sampled_front(problem: Problem, budgets: int) -> np.ndarray:
    """Plans (one row each): every convex-hull vertex, then the exact optimum at ``budgets`` evenly spaced
    budgets from the lightest plan to the problem's limit."""
    a = Arrays.of(problem)
    hull = Hull.of(a.d, a.w[0])
    top = min(float(a.cap[0]), float(hull.dw.sum()))
    # vertex t applies segments < t: last[t, u] = 1 + the last segment of unit u among them (0: none)
    n_vertices = hull.split(top)[0] + 1
    events = np.zeros((n_vertices, problem.n_units), dtype=np.int16 if n_vertices < 1 << 15 else np.int32)
    events[np.arange(1, n_vertices), hull.unit[: n_vertices - 1]] = np.arange(1, n_vertices)
    last = np.maximum.accumulate(events, axis=0)
    options = np.concatenate([[0], hull.to]).astype(np.int8 if problem.damage.shape[1] < 128 else np.int16)
    vertices = np.where(last > 0, options[last], hull.start.astype(options.dtype)[None])
    plans = []
    for cap in tqdm(np.linspace(0.0, top, budgets), desc="front budgets", leave=False, disable=budgets < 64):
        part = Arrays(a.d, a.w, np.array([cap]), a.tol)
        plans.append(search_core(part, *relax(part, hull), 1 << 20)[0])
    return np.concatenate([vertices, np.array(plans, dtype=vertices.dtype).reshape(-1, problem.n_units)])


class _LazyPlans:
    """The BitPlan of each front point, built when first asked for (fronts can have many points)."""

    def __init__(self, problem: Problem, choices: np.ndarray, status: str, solver: str) -> None:
        self.problem, self.choices, self.status, self.solver = problem, choices, status, solver
        self._cache: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.choices)

    def __getitem__(self, i: int):
        if i not in self._cache:
            self._cache[i] = self.problem.result(self.choices[i], self.status, self.solver, {}, 0.0).plan
        return self._cache[i]


def _nondominated(points: np.ndarray) -> np.ndarray:
    """Mask of points not weakly dominated by another (all columns minimized; of duplicates the first stays)."""
    order = np.lexsort(points.T[::-1])  # by column 0, then 1, ...
    keep = np.zeros(len(points), dtype=bool)
    if points.shape[1] == 2:  # sorted by cost: keep each point that lowers the best damage so far
        tail = points[order, 1]
        previous_best = np.concatenate([[np.inf], np.minimum.accumulate(tail)[:-1]])
        keep[order] = tail < previous_best
        return keep
    kept = np.empty((0, points.shape[1] - 1))
    for i in order:  # earlier points have smaller column 0: p is dominated if one is <= on the rest
        rest = points[i, 1:]
        if len(kept) and np.any(np.all(kept <= rest, axis=1)):
            continue
        keep[i] = True
        kept = np.vstack([kept, rest])
    return keep
