"""Exact multiple-choice knapsack for any number of constraints: reduce to a small core, then DP over it.

1. Relax: Lagrangian multipliers ``lam`` give a lower bound ``lb`` and a feasible plan gives ``ub``
   (solvers/lagrange.py; exact LP relaxation for one constraint).
2. Reduce: option k of unit u can be in a plan better than ``ub`` only if its reduced cost is at most
   ``ub - lb``. Units left with one such option are fixed; the others form the core (usually a handful).
3. Search: a DP over the core's units whose states are exact (damage, weights) sums of partial plans —
   no integerized budget — pruned by feasibility, by the Lagrangian bound of the rest, and by dominance
   (exact for up to two constraints that can still bind). This is the idea behind Pisinger's core
   algorithms for knapsack problems. A first pass capped at ``BEAMS`` states per stage usually settles it.

If the states exceed ``max_states`` the search keeps the most promising ones; the plan is then feasible but
not proven optimal (status ``feasible``, gap from ``lb``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpsearch.core import InfeasibleBudgetError, MpsearchError
from mpsearch.core.params import Interval
from solvers.base import Solver
from solvers.lagrange import Hull, dual_multipliers, lagrangian
from solvers.problem import SOLVER_RTOL, Problem, relative_gap

BEAMS = (2048,)


@dataclass
class Arrays:
    """A problem as dense arrays: damage ``d`` (inf = unavailable), residual weights ``w`` (K, n, m) above each
    unit's lightest option and scaled, capacities ``cap`` and a feasibility tolerance ``tol`` per constraint."""

    d: np.ndarray
    w: np.ndarray
    cap: np.ndarray
    tol: np.ndarray

    @classmethod
    def of(cls, problem: Problem) -> Arrays:
        base, w = problem.residual_costs()
        scale = np.maximum(w.max(axis=(1, 2)), 1e-300)
        limits = problem.limits()
        cap = (limits - base.sum(axis=1)) / scale
        tol = SOLVER_RTOL * np.maximum(np.abs(limits), 1e-300) / scale
        return cls(np.where(problem.valid, problem.damage, np.inf), w / scale[:, None, None], cap, tol)

    def damage_of(self, choice: np.ndarray) -> float:
        return float(self.d[np.arange(len(choice)), choice].sum())

    def fits(self, choice: np.ndarray) -> bool:
        return bool(np.all(self.w[:, np.arange(len(choice)), choice].sum(axis=1) <= self.cap + self.tol))


def relax(a: Arrays, hull: Hull | None = None) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Multipliers, lower bound and a feasible plan (None if the greedy fill met none). ``hull``: the hull of
    ``a.d`` over ``a.w[0]`` when already built (one constraint; the sampled Pareto front reuses it)."""
    if a.w.shape[0] == 1:
        hull = Hull.of(a.d, a.w[0]) if hull is None else hull
        lam = np.array([hull.split(a.cap[0])[1]])
    else:
        lam = dual_multipliers(a.d, a.w, a.cap)
        # one surrogate constraint weighs the others by their multipliers: its hull orders the greedy fill
        mu = lam + 1e-9 * max(lam.max(), 1e-300) if lam.max() > 0 else np.ones_like(lam)
        hull = Hull.of(a.d, np.tensordot(mu, a.w, axes=1))
    return lam, lagrangian(a.d, a.w, a.cap, lam)[0], hull.filled_plan(a.w, a.cap + a.tol)


def search_core(a: Arrays, lam: np.ndarray, lb: float, incumbent: np.ndarray | None, max_states: int):
    """Best plan (option per unit), whether it is proven optimal, and the number of core units and states.

    A first pass keeps at most 2048 states per stage: if it never has to drop one it is exact; otherwise
    its plan (often optimal) becomes the incumbent that shrinks the core and prunes the exact pass."""
    exact = False
    for beam in BEAMS:
        if beam >= max_states:
            break
        plan, exact, core_units, peak = _core_pass(a, lam, lb, incumbent, beam)
        if exact:
            break
        incumbent = plan
    if not exact:
        plan, exact, core_units, peak = _core_pass(a, lam, lb, incumbent, max_states)
    if plan is None:  # a capped pass may have dropped the feasible states; an exact one proves there are none
        if exact:
            raise InfeasibleBudgetError("no plan meets all constraints at once", "relax one of the constraints")
        raise MpsearchError(f"no plan found within max_states={max_states}", "raise max_states")
    return plan, exact, core_units, peak


def _core_pass(a: Arrays, lam: np.ndarray, lb: float, incumbent: np.ndarray | None, max_states: int):
    ub = a.damage_of(incumbent) if incumbent is not None else np.inf
    eps = 1e-12 * max(abs(ub), abs(lb), 1e-300) if np.isfinite(ub) else 0.0
    pen = a.d + np.tensordot(lam, a.w, axes=1)
    rc = pen - pen.min(axis=1, keepdims=True)  # reduced costs
    free = np.isfinite(a.d) & (rc <= (ub - lb) + eps)
    n_free = free.sum(axis=1)
    if np.any(n_free == 0):  # only when rounding excluded every option of a unit: nothing to improve on
        return incumbent, True, 0, 0
    core = np.flatnonzero(n_free > 1)
    choice = np.where(n_free == 1, free.argmax(axis=1), -1)
    fixed = np.flatnonzero(n_free == 1)
    pen = np.where(free, pen, np.inf)
    # units whose cheapest deviation from the Lagrangian choice costs most go first: their states die early
    second = np.sort(np.where(free[core], rc[core], np.inf), axis=1)[:, min(1, a.d.shape[1] - 1)]
    core = core[np.argsort(-second, kind="stable")]
    # bounds on what the units after stage i can still add
    rest_pen = np.concatenate([np.cumsum(pen[core].min(axis=1)[::-1])[::-1], [0.0]])
    wmin = np.where(free[None], a.w, np.inf).min(axis=2)[:, core]  # (K, core)
    wmax = np.where(free[None], a.w, -np.inf).max(axis=2)[:, core]
    rest_w, rest_wmax = (np.cumsum(np.pad(x, ((0, 0), (0, 1)))[:, ::-1], axis=1)[:, ::-1] for x in (wmin, wmax))

    # per stage i: the weight a state may have to stay completable / to be safe, and its bound's offset
    room = (a.cap + a.tol)[:, None] - rest_w[:, 1:]  # (K, core)
    safe_room = (a.cap + a.tol)[:, None] - rest_wmax[:, 1:]
    offset = rest_pen[1:] - a.cap @ lam
    dmg = np.array([a.d[fixed, choice[fixed]].sum()])
    wt = a.w[:, fixed, choice[fixed]].sum(axis=1)[None, :]  # (S, K)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    exact, peak = True, 1
    for i, u in enumerate(core):
        opts = np.flatnonzero(free[u])
        dmg = (dmg[:, None] + a.d[u, opts][None]).ravel()  # state s, option opts[o] at s * len(opts) + o
        wt = (wt[:, None, :] + a.w[:, u, opts].T[None]).reshape(-1, len(lam))
        bound = dmg + wt @ lam + offset[i]
        keep = np.flatnonzero(np.all(wt <= room[:, i], axis=1) & (bound <= ub + eps))
        # a state that no completion can push over constraint j (``safe``) beats any other on j
        safe = wt[keep] <= safe_room[:, i]
        relevant = ~safe.all(axis=0)
        keep = keep[undominated(dmg[keep], np.where(safe, -1.0, wt[keep])[:, relevant])]
        if len(keep) > max_states:
            keep, exact = keep[np.argsort(bound[keep], kind="stable")[:max_states]], False
        dmg, wt = dmg[keep], wt[keep]
        trail.append((keep // len(opts), opts[keep % len(opts)]))
        peak = max(peak, len(keep))
        if len(keep) == 0:
            break
    if len(dmg) == 0 or (core.size and len(trail) < len(core)) or dmg.min() >= ub:
        return incumbent, exact, len(core), peak
    state = int(dmg.argmin())
    for u, (parent, option) in zip(core[::-1], trail[::-1]):
        choice[u] = option[state]
        state = parent[state]
    return choice, exact, len(core), peak


def undominated(damage: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Indices (in no particular order) of the states that no other state matches or beats on damage and
    every weight column (of equal states one stays). Up to two weight columns; with more, none is dropped."""
    n_cols = weights.shape[1]
    if n_cols == 0:
        return np.array([int(np.argmin(damage))]) if len(damage) else np.zeros(0, dtype=int)
    if n_cols > 2:
        return np.arange(len(damage))
    order = np.lexsort((*weights.T[::-1], damage))  # by damage, then the weights: dominators come first
    w = weights[order]
    if n_cols == 1:
        seen = np.concatenate([[np.inf], np.minimum.accumulate(w[:-1, 0])])
        return order[w[:, 0] < seen]
    return order[~_dominated_2d(w[:, 0], w[:, 1])]


def _dominated_2d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dominated[i]: some j < i has x[j] <= x[i] and y[j] <= y[i]. Divide and conquer over positions
    (blocks of 1, 2, 4, ...: each right block against its left sibling's prefix minima), every block of a
    level at once; integer ranks keep the segment offsets exact."""
    n = len(x)
    a = np.unique(x, return_inverse=True)[1].astype(np.int64)
    b = np.unique(y, return_inverse=True)[1].astype(np.int64)
    pos, span = np.arange(n), n + 1
    dominated = np.zeros(n, dtype=bool)
    size = 1
    while size < n:
        pair = pos // (2 * size)
        left = (pos // size) % 2 == 0
        lp, rp = np.flatnonzero(left), np.flatnonzero(~left)
        key = pair[lp] * span + a[lp]
        o = np.argsort(key, kind="stable")
        key, lpair = key[o], pair[lp][o]
        top = int(pair[-1]) + 1  # later pairs get smaller offsets, so a running min never crosses pairs
        run_min = np.minimum.accumulate(b[lp][o] + (top - lpair) * span)
        at = np.searchsorted(key, pair[rp] * span + a[rp], side="right") - 1
        ok = at >= 0
        ok[ok] = lpair[at[ok]] == pair[rp][ok]
        hit = np.zeros(len(rp), dtype=bool)
        hit[ok] = run_min[at[ok]] - (top - pair[rp][ok]) * span <= b[rp][ok]
        dominated[rp[hit]] = True
        size *= 2
    return dominated


class CoreDP(Solver):
    """Exact solver for any number of constraints (see the module docstring). Ties are honoured. ``extra``
    reports the core's size (``core_units``) and the largest state list (``peak_states``)."""

    exact = True  # proves optimality (status "optimal") when it returns one
    name = "core"

    _parameter_constraints = {"max_states": [Interval(int, 1)]}

    def __init__(self, max_states: int = 1 << 20) -> None:
        self.max_states = max_states

    def _solve(self, problem: Problem):
        a = Arrays.of(problem)
        lam, lb, incumbent = relax(a)
        choice, exact, core_units, peak = search_core(a, lam, lb, incumbent, self.max_states)
        self.extra_.update(core_units=core_units, peak_states=peak, lower_bound=lb)
        if exact:
            return choice, "optimal", 0.0
        value = a.damage_of(choice)
        return choice, "feasible", relative_gap(value, lb)
