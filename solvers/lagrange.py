"""Lagrangian relaxation of the multiple-choice knapsack (MCKP): multipliers, lower bounds, reduced costs.

min sum_u d[u, k_u]  s.t.  sum_u w[j, u, k_u] <= cap[j] for every constraint j.

For multipliers lam >= 0, ``L(lam) = sum_u min_k (d + lam . w)[u, k] - lam . cap`` is a lower bound on the
optimum, and a plan that uses option k of unit u costs at least ``L(lam) + rc[u, k]`` (its reduced cost).
With one constraint the best ``lam`` and the LP relaxation come exactly from the per-unit lower convex hulls
(``Hull``); with several, ``dual_multipliers`` searches them (the first exactly by its hull, each other
by a one-dimensional cutting-plane search).

Written here rather than taken from a library: no maintained Python package solves MCKP relaxations, and an
LP solver (HiGHS, GLOP) would be slower than these few vectorized passes and could not share a process with
OR-Tools (see solvers/ilp.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers.problem import SOLVER_RTOL


@dataclass
class Hull:
    """The lower convex hull of every unit's (weight, damage) options, as segments in LP-greedy order.

    Start from each unit's lightest option (``start``); segment t moves unit ``unit[t]`` from option
    ``frm[t]`` to ``to[t]``, adding ``dw[t] > 0`` weight and removing ``dd[t] > 0`` damage, at ``slope[t] =
    dd/dw``. Segments are sorted by slope, best first, and each unit's segments keep their chain order, so
    every prefix of them is an integer plan that is optimal for its own weight (a supported Pareto point).
    """

    start: np.ndarray
    unit: np.ndarray
    frm: np.ndarray
    to: np.ndarray
    dw: np.ndarray
    dd: np.ndarray
    slope: np.ndarray

    @classmethod
    def of(cls, d: np.ndarray, w: np.ndarray) -> Hull:
        """``d``: damage (inf where an option is unavailable); ``w``: weights of one constraint."""
        n = d.shape[0]
        idx = np.arange(n)
        ok = np.isfinite(d)
        w_ok = np.where(ok, w, np.inf)
        lightest = w_ok <= w_ok.min(axis=1, keepdims=True)
        cur = np.where(lightest, d, np.inf).argmin(axis=1)  # lightest option, least damage among equals
        start = cur.copy()
        parts = []
        for step in range(d.shape[1] - 1):
            dw = w - w[idx, cur][:, None]
            dd = d[idx, cur][:, None] - d
            move = ok & (dw > 0) & (dd > 0)
            slope = np.where(move, dd / np.where(move, dw, 1.0), -np.inf)
            nxt = slope.argmax(axis=1)
            best = slope[idx, nxt]
            on = np.flatnonzero(best > -np.inf)
            if len(on) == 0:
                break
            parts.append((on, cur[on], nxt[on], dw[on, nxt[on]], dd[on, nxt[on]], best[on], np.full(len(on), step)))
            cur = cur.copy()
            cur[on] = nxt[on]
        if not parts:
            empty = np.zeros(0)
            return cls(start, empty.astype(int), empty.astype(int), empty.astype(int), empty, empty, empty)
        unit, frm, to, dw, dd, slope, step = (np.concatenate(p) for p in zip(*parts))
        order = np.lexsort((step, -slope))
        return cls(start, unit[order], frm[order], to[order], dw[order], dd[order], slope[order])

    def split(self, capacity: float) -> tuple[int, float]:
        """Number of whole segments that fit in ``capacity`` (weight above the start plan) and the multiplier
        there: the slope of the first segment that does not fit, or 0 when all fit."""
        fits = int(np.searchsorted(np.cumsum(self.dw), capacity * (1 + SOLVER_RTOL), side="right"))
        lam = float(self.slope[fits]) if fits < len(self.slope) else 0.0
        return fits, lam

    def plan(self, n_segments: int) -> np.ndarray:
        """The plan after the first ``n_segments`` segments (later segments of a unit overwrite earlier)."""
        choice = self.start.copy()
        choice[self.unit[:n_segments]] = self.to[:n_segments]
        return choice

    def filled_plan(self, w: np.ndarray, cap: np.ndarray) -> np.ndarray | None:
        """A good feasible plan: from the start plan, apply segments best slope first while every constraint
        (``w``: (K, n, m), ``cap``: (K,)) still holds; a segment that does not fit is skipped, not the rest.
        None if even the start plan breaks a constraint."""
        idx = np.arange(len(self.start))
        left = cap * (1 + SOLVER_RTOL) - w[:, idx, self.start].sum(axis=1)
        if np.any(left < 0):
            return None
        gain = w[:, self.unit, self.to] - w[:, self.unit, self.frm]  # (K, segments)
        ok = np.all(np.cumsum(gain, axis=1) <= left[:, None], axis=0)
        fits = int(ok.argmin()) if not ok.all() else len(ok)
        choice = self.plan(fits)
        left = left - gain[:, :fits].sum(axis=1)
        smallest_after = np.minimum.accumulate(gain[:, ::-1], axis=1)[:, ::-1]
        unit, frm, to = self.unit.tolist(), self.frm.tolist(), self.to.tolist()
        for t in range(fits + 1, len(unit)):  # a plain loop: each step depends on the ones before
            if np.any(smallest_after[:, t] > left):
                break
            if choice[unit[t]] == frm[t] and np.all(gain[:, t] <= left):
                choice[unit[t]] = to[t]
                left = left - gain[:, t]
        return choice


def lagrangian(d: np.ndarray, w: np.ndarray, cap: np.ndarray, lam: np.ndarray):
    """L(lam), the per-unit minimizing plan, and its constraint totals. ``w``: (K, n, m), zero where
    unavailable (``d`` is inf there)."""
    pen = d + np.tensordot(lam, w, axes=1)
    choice = pen.argmin(axis=1)
    idx = np.arange(d.shape[0])
    value = float(pen[idx, choice].sum() - lam @ cap)
    return value, choice, w[:, idx, choice].sum(axis=1)


def dual_multipliers(d: np.ndarray, w: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Multipliers for K >= 2 constraints that (nearly) maximize L. The first multiplier is
    exact for the others (its hull); each other one maximizes L along its axis (exact for K = 2, where L's
    maximum over the first is a concave function of the second; K > 2 cycles twice over the axes)."""
    n, n_con = d.shape[0], w.shape[0]
    lam = np.zeros(n_con)

    def along(j: int, x: float) -> tuple[float, float]:
        """max over lam[0] of L with lam[j] = x (the others as they are), and its slope in lam[j]."""
        lam[j] = x
        hull = Hull.of(d + np.tensordot(lam[1:], w[1:], axes=1), w[0])
        lam[0] = hull.split(cap[0] - w[0][np.arange(n), hull.start].sum())[1]
        value, _, totals = lagrangian(d, w, cap, lam)
        return value, float(totals[j] - cap[j])

    finite = np.isfinite(d)
    spread = float((np.where(finite, d, -np.inf).max(1) - np.where(finite, d, np.inf).min(1)).sum())
    for _ in range(2 if n_con > 2 else 1):
        for j in range(1, n_con):
            lam[j] = _concave_max(lambda x, j=j: along(j, x), spread / max(float(w[j].max(1).sum()), 1e-300))
    along(n_con - 1, lam[-1])  # sets lam[0] for the final others
    return lam.copy()


def _concave_max(f, scale: float, iters: int = 60) -> float:
    """Maximizer over x >= 0 of a concave piecewise-linear function given as f(x) -> (value, slope).

    Brackets the maximum (growing by 10x from ``scale``), then cuts it with the intersection of the two
    end tangents (Kelley's method in one dimension, with bisection as the fallback): on a piecewise-linear
    function it stops exactly at a kink once the tangents' bound is met."""
    v0, g0 = f(0.0)
    if g0 <= 0:
        return 0.0
    lo, vlo, glo = 0.0, v0, g0
    hi = max(scale, 1e-300)
    for _ in range(80):
        vhi, ghi = f(hi)
        if ghi <= 0:
            break
        lo, vlo, glo, hi = hi, vhi, ghi, hi * 10
    if ghi >= 0:  # flat at hi, or never turned down (the constraint cannot be met whatever its multiplier)
        return hi
    best_x, best_v = (lo, vlo) if vlo >= vhi else (hi, vhi)
    for _ in range(iters):
        x = (vhi - vlo + glo * lo - ghi * hi) / (glo - ghi)  # glo > 0 > ghi
        if not lo < x < hi:
            x = 0.5 * (lo + hi)
        bound = vlo + glo * (x - lo)
        vx, gx = f(x)
        if vx > best_v:
            best_x, best_v = x, vx
        if gx == 0 or bound - vx <= 1e-13 * max(abs(vx), 1e-300) or hi - lo <= 1e-12 * hi:
            break
        if gx > 0:
            lo, vlo, glo = x, vx, gx
        else:
            hi, vhi, ghi = x, vx, gx
    return best_x
