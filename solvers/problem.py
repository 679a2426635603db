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

FEAS_RTOL = 1e-9  # a plan within this relative excess of every limit is feasible (``is_feasible``, ``slack``)
SOLVER_RTOL = 1e-12  # the solvers' own, stricter tolerance: what they return is feasible by FEAS_RTOL


def relative_gap(value: float, bound: float) -> float:
    """The optimality gap every solver reports: (objective - lower bound) / |objective| (0 when they meet)."""
    return 0.0 if value == bound else float((value - bound) / max(abs(value), 1e-300))


def _union_find_groups(layers: list[str], ties: list[list[str]]) -> list[list[str]]:
    """Decision units in first-appearance order: each tie group (merged where groups overlap) once, every
    untied layer alone. Only tied layers go through the union-find."""
    known = set(layers)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in ties:
        for name in group:
            if name not in known:
                raise InvalidTableError(f"tie names layer {name!r} that is not in the table", "tie table layers")
        for a, b in zip(group, group[1:]):
            parent[find(b)] = find(a)
    if not parent:
        return [[name] for name in layers]
    groups: dict[str, list[str]] = {}
    units: list[list[str]] = []
    for name in layers:
        if name not in parent:
            units.append([name])
            continue
        root = find(name)
        if root not in groups:
            groups[root] = []
            units.append(groups[root])
        groups[root].append(name)
    return units


class Problem:
    """Arrays: ``damage[u, k]`` and ``costs[j][u, k]`` for unit u, option k (inf where k is not available);
    ``option_codes[u, k]`` indexes ``option_names`` (-1: no k-th option).

    Built with array operations on the table's factorized layer/option codes: only tie groups are handled
    one by one, so 20000 layers x 7 options compile in milliseconds and a million layers in about a second.
    """

    def __init__(self, table: CostTable, budget: Budget, objective: str = "damage") -> None:
        if objective not in table.frame.columns:
            raise InvalidTableError(f"objective column {objective!r} is not in the table", "pick a table column")
        self.table, self.budget, self.objective_column = table, budget, objective
        frame = table.frame
        ties = [list(g) for g in table.meta.get("ties", [])] + [list(g) for g in budget.ties]
        layers = table.layers
        self.units = _union_find_groups(layers, ties)
        self.constraints = budget.constraints(frame, table.total_params())
        self.option_names = table.options

        # per layer, the table rows of its options in table order: row_at[layer, position]
        codes = np.asarray(table.layer_codes, dtype=np.int64)
        counts = np.bincount(codes, minlength=len(layers))
        order = np.argsort(codes, kind="stable")
        position = np.empty(len(codes), dtype=np.int64)
        position[order] = np.arange(len(codes)) - np.repeat(np.cumsum(counts) - counts, counts)
        row_at = np.full((len(layers), int(counts.max())), -1, dtype=np.int64)
        row_at[codes, position] = np.arange(len(codes))
        option_of_row = np.asarray(table.option_codes, dtype=np.int64)

        n_opts = row_at.shape[1]
        self.option_codes = np.full((len(self.units), n_opts), -1, dtype=np.int64)
        row_sets: list[np.ndarray] = []  # per unit with several layers: (members, options) rows
        tied = [u for u, unit in enumerate(self.units) if len(unit) > 1]
        alone = np.array([u for u, unit in enumerate(self.units) if len(unit) == 1], dtype=np.int64)
        index = {name: i for i, name in enumerate(layers)} if tied else {}
        alone_layer = np.array([index[self.units[u][0]] for u in alone], dtype=np.int64) if tied else alone
        alone_rows = row_at[alone_layer]
        self.option_codes[alone] = np.where(alone_rows >= 0, option_of_row[alone_rows], -1)
        for u in tied:
            by_option = []  # per member: {option code: its row}
            for m in (index[name] for name in self.units[u]):
                rows = row_at[m][row_at[m] >= 0]
                by_option.append(dict(zip(option_of_row[rows].tolist(), rows.tolist())))
            common = [o for o in by_option[0] if all(o in b for b in by_option[1:])]
            if not common:
                raise InvalidTableError(f"tied layers {self.units[u]} share no option", "give them common options")
            self.option_codes[u, : len(common)] = common
            row_sets.append(np.array([[b[o] for o in common] for b in by_option]))

        def per_unit(values: np.ndarray) -> np.ndarray:
            out = np.full(self.option_codes.shape, np.inf)
            out[alone] = np.where(alone_rows >= 0, values[alone_rows], np.inf)
            for u, rows in zip(tied, row_sets):
                out[u, : rows.shape[1]] = values[rows].sum(axis=0)
            return out

        self.damage = per_unit(frame[objective].to_numpy(float))
        self.costs = [per_unit(np.asarray(con.row_cost, dtype=float)) for con in self.constraints]
        self.valid = np.isfinite(self.damage)
        self.table_fingerprint = table.fingerprint()
        self.check_feasible()

    @property
    def unit_options(self) -> list[list[str]]:
        """Each unit's option names, in its column order."""
        names = self.option_names
        return [[names[c] for c in row if c >= 0] for row in self.option_codes]

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

    def slack(self, choice: np.ndarray) -> np.ndarray:
        """Per constraint, how much more a plan may cost than ``choice`` does (within the feasibility
        tolerance); negative where ``choice`` breaks the constraint."""
        _, totals = self.evaluate(choice)
        return self.limits() * (1 + FEAS_RTOL) + 1e-9 - totals

    def is_feasible(self, choice: np.ndarray) -> bool:
        return bool(np.all(self.slack(choice) >= 0))

    def choice_of(self, plan) -> np.ndarray:
        """A plan (a BitPlan or {layer: option}) of this problem's table as one option index per unit."""
        return np.array([opts.index(plan[unit[0]]) for unit, opts in zip(self.units, self.unit_options)])

    def result(self, choice, status: str, solver: str, params: dict, wall: float, gap: float = 0.0) -> SearchResult:
        choice = np.asarray(choice, dtype=int)
        objective, totals = self.evaluate(choice)
        names = np.array(self.option_names, dtype=object)[self.option_codes[np.arange(self.n_units), choice]]
        assignments = {layer: option for unit, option in zip(self.units, names) for layer in unit}
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
            "architecture": self.table.meta.get("architecture"),
            "aliases": self.table.meta.get("aliases") or {},
            "runtime": self.table.meta.get("runtime"),
            "quantizer": self.table.meta.get("quantizer"),  # its spec: apply/evaluate rebuild that math
            "runtime_inputs": bool(self.table.meta.get("runtime_inputs")),  # evaluate measures as searched
        }
        constraints = {
            c.name: ConstraintValue(c.name, float(c.report(t)), float(c.report(c.limit)))
            for c, t in zip(self.constraints, totals)
        }
        return SearchResult(BitPlan(ordered, provenance), objective, constraints, status, gap, wall)
