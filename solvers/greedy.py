"""Greedy baseline (MPTQ-ViT style): start from the largest option everywhere, then repeatedly take the move
with the least damage increase per unit of saved cost until the budget holds."""

from __future__ import annotations

import numpy as np

from mpsearch.core import InfeasibleBudgetError
from solvers.base import Solver
from solvers.problem import Problem


class Greedy(Solver):
    """Marginal damage per saved cost. With several constraints the saving of a move is how much it reduces
    the total relative excess sum_j max(0, total_j - limit_j) / limit_j; moves that reduce nothing are never
    taken, so the loop ends. Fast, not exact: status ``feasible``, gap unknown (NaN)."""

    name = "greedy"

    def _solve(self, problem: Problem):
        valid = problem.valid
        limits = problem.limits()
        costs = [np.where(valid, c, np.inf) for c in problem.costs]
        # start: the most expensive option of each unit by the first constraint (most bits)
        choice = np.where(valid, costs[0], -np.inf).argmax(axis=1)
        idx = np.arange(problem.n_units)
        damage = np.where(valid, problem.damage, np.inf)
        scale = np.abs(limits)
        while True:
            current = [c[idx, choice] for c in costs]
            totals = np.array([c.sum() for c in current])
            excess = np.maximum(totals - limits, 0) / scale
            if np.all(excess <= 1e-9):
                return choice, "feasible", float("nan")
            new_excess = sum(
                np.maximum(totals[j] - current[j][:, None] + costs[j] - limits[j], 0) / scale[j]
                for j in range(len(costs))
            )
            reduction = excess.sum() - np.where(valid, new_excess, np.inf)
            extra = np.maximum(damage - damage[idx, choice][:, None], 0)
            ratio = np.where(reduction > 1e-15, extra / np.where(reduction > 1e-15, reduction, 1), np.inf)
            u, k = np.unravel_index(np.argmin(ratio), ratio.shape)
            if not np.isfinite(ratio[u, k]):
                raise InfeasibleBudgetError(
                    "greedy found no plan meeting all constraints (they may be jointly infeasible)",
                    "relax a constraint or use solver 'ilp' to decide",
                )
            choice[u] = k
