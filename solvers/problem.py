"""Problem: a CostTable + Budget compiled into dense arrays over decision units.

A decision unit is a tie group (layers that must share one option) or a single untied layer. Solvers choose
one option index per unit; ``Problem.result`` turns that choice back into a BitPlan and a SearchResult.
"""

from __future__ import annotations

import math

import numpy as np

from mpsearch.core import (
    BitPlan,
    Budget,
    ConstraintValue,
    CostTable,
    InfeasibleBudgetError,
    InvalidTableError,
    SearchResult,
)

FEAS_RTOL = 1e-9


def _union_find_groups(layers: list[str], ties: list[list[str]]) -> list[list[str]]:
    parent = {name: name for name in layers}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in ties:
        for name in group:
            if name not in parent:
                raise InvalidTableError(f"tie names layer {name!r} that is not in the table", "tie table layers")
        for a, b in zip(group, group[1:]):
            parent[find(b)] = find(a)
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


class Problem:
    """Arrays: ``damage[u, k]`` and ``costs[j][u, k]`` for unit u, option k (inf where k is not available)."""

    def __init__(self, table: CostTable, budget: Budget, objective: str = "damage") -> None:
        if objective not in table.frame.columns:
            raise InvalidTableError(f"objective column {objective!r} is not in the table", "pick a table column")
        self.table, self.budget, self.objective_column = table, budget, objective
        frame = table.frame
        ties = [list(g) for g in table.meta.get("ties", [])] + [list(g) for g in budget.ties]
        self.units = _union_find_groups(table.layers, ties)
        self.constraints = budget.constraints(frame)
        row_of = {(r.layer, r.option): i for i, r in enumerate(frame[["layer", "option"]].itertuples())}
        per_layer = frame.groupby("layer", sort=False)["option"].agg(list).to_dict()

        self.unit_options: list[list[str]] = []
        for unit in self.units:
            common = [o for o in per_layer[unit[0]] if all((m, o) in row_of for m in unit[1:])]
            if not common:
                raise InvalidTableError(f"tied layers {unit} share no option", "give tied layers common options")
            self.unit_options.append(common)
        n_opts = max(len(o) for o in self.unit_options)
        shape = (len(self.units), n_opts)
        values = frame[objective].to_numpy(float)
        self.damage = np.full(shape, np.inf)
        self.costs = [np.full(shape, np.inf) for _ in self.constraints]
        for u, (unit, opts) in enumerate(zip(self.units, self.unit_options)):
            for k, opt in enumerate(opts):
                rows = [row_of[(m, opt)] for m in unit]
                self.damage[u, k] = values[rows].sum()
                for j, con in enumerate(self.constraints):
                    self.costs[j][u, k] = con.row_cost[rows].sum()
        self.valid = np.isfinite(self.damage)
        self.table_fingerprint = table.fingerprint()
        self.check_feasible()

    @property
    def n_units(self) -> int:
        return len(self.units)

    def limits(self) -> np.ndarray:
        return np.array([c.limit for c in self.constraints])

    def check_feasible(self) -> None:
        """Raise InfeasibleBudgetError if some constraint cannot be met even by its cheapest plan."""
        for con, cost in zip(self.constraints, self.costs):
            smallest = float(cost.min(axis=1).sum())
            if smallest > con.limit * (1 + FEAS_RTOL):
                shown_limit, needs = con.report(con.limit), con.report(smallest)
                needs_txt = f"{math.ceil(needs * 1000) / 1000:g}" if con.name == "avg_bits" else f"{math.ceil(needs)}"
                raise InfeasibleBudgetError(
                    f"budget {shown_limit:g} {Budget.unit(con.name)} is infeasible: "
                    f"the smallest plan with these options needs {needs_txt}",
                    f"raise {con.name} to at least {needs_txt} or add smaller options",
                )

    def residual_costs(self) -> tuple[np.ndarray, np.ndarray]:
        """Per constraint: each unit's cheapest option cost ``base`` (K, n) and every option's cost above it
        (K, n, m; 0 where the option is unavailable)."""
        raw = np.stack([np.where(self.valid, c, np.inf) for c in self.costs])
        base = raw.min(axis=2)
        return base, np.where(self.valid[None], raw - base[..., None], 0.0)

    def evaluate(self, choice: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective and constraint totals of a choice (one option index per unit)."""
        idx = np.arange(self.n_units)
        totals = np.array([c[idx, choice].sum() for c in self.costs])
        return float(self.damage[idx, choice].sum()), totals

    def is_feasible(self, choice: np.ndarray) -> bool:
        _, totals = self.evaluate(choice)
        return bool(np.all(totals <= self.limits() * (1 + FEAS_RTOL) + 1e-9))

    def result(self, choice, status: str, solver: str, params: dict, wall: float, gap: float = 0.0) -> SearchResult:
        choice = np.asarray(choice, dtype=int)
        objective, totals = self.evaluate(choice)
        assignments = {}
        for unit, opts, k in zip(self.units, self.unit_options, choice):
            for layer in unit:
                assignments[layer] = opts[k]
        ordered = {layer: assignments[layer] for layer in self.table.layers}
        provenance = {
            "solver": solver,
            "solver_params": params,
            "budget": self.budget.to_dict(),
            "objective_column": self.objective_column,
            "table_fingerprint": self.table_fingerprint,
            "estimator": self.table.meta.get("estimator"),
            "estimator_params": self.table.meta.get("params"),
            "seed": self.table.meta.get("seed"),
            "model": self.table.meta.get("model"),
            "model_fingerprint": self.table.meta.get("model_fingerprint"),
            "options": self.table.options,
        }
        constraints = {
            c.name: ConstraintValue(c.name, float(c.report(t)), float(c.report(c.limit)))
            for c, t in zip(self.constraints, totals)
        }
        return SearchResult(BitPlan(ordered, provenance), objective, constraints, status, gap, wall)
