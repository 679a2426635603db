"""Exact solvers against brute force on small random problems; infeasibility; DP resolution bound."""

import numpy as np
import pytest

from mpsearch.core import Budget, CostTable, InfeasibleBudgetError, LayerInfo, cost_rows, parse_options
from solvers import DP, ILP, BruteForce, Problem

OPTIONS = parse_options(["int2", "int3", "int4", "int6", "int8"])


def random_table(n_layers: int, seed: int, ties=()) -> CostTable:
    rng = np.random.default_rng(seed)
    layers = [
        LayerInfo(
            f"net.{i}.proj",
            (int(rng.integers(1, 6)) * 8, int(rng.integers(1, 5)) * 16),
            "linear",
            macs=int(rng.integers(100, 5000)),
        )
        for i in range(n_layers)
    ]
    frame = cost_rows(layers, OPTIONS)
    sens = rng.lognormal(size=n_layers)
    bits = frame["option"].map(lambda o: int(o[3:])).to_numpy()
    frame["damage"] = np.repeat(sens, len(OPTIONS)) * 4.0 ** (-bits) * rng.uniform(0.5, 1.5, len(frame))
    return CostTable(frame, {"estimator": "random", "ties": [list(t) for t in ties]})


def budgets(table: CostTable, rng) -> Budget:
    lo, hi = table.uniform_cost("int2"), table.uniform_cost("int8")
    return Budget(avg_bits=float(rng.uniform(lo + 0.3, hi - 0.5)))


def test_dp_coarse_resolution_reports_a_true_gap():
    table = random_table(7, 3)
    problem = Problem(table, Budget(avg_bits=4.37))
    oracle = BruteForce().solve(problem)
    coarse = DP(max_buckets=40).solve(problem)
    assert coarse.constraints["avg_bits"].slack >= 0  # rounding up keeps it feasible
    assert coarse.objective >= oracle.objective - 1e-15
    lower = coarse.objective * (1 - coarse.gap)  # the floor-rounded relaxation is a lower bound
    assert lower <= oracle.objective + 1e-12
    assert coarse.status in ("optimal", "feasible")


def test_infeasible_budget_names_the_minimum():
    table = random_table(4, 0)
    smallest = table.uniform_cost("int2")
    with pytest.raises(InfeasibleBudgetError, match=r"budget 1\.5 avg bits is infeasible: the smallest plan") as err:
        Problem(table, Budget(avg_bits=1.5))
    needs = float(str(err.value).split("needs ")[1].split(";")[0])
    assert smallest <= needs < smallest + 0.001
    Problem(table, Budget(avg_bits=needs))  # the number it names is feasible


def test_jointly_infeasible_constraints_raise():
    # size wants few bits, the "latency" column (made larger for fewer bits) wants many: each alone is
    # feasible, both together are not
    table = random_table(4, 1)
    frame = table.frame.assign(latency=1.0 / table.frame["bits"])
    t2 = CostTable(frame, {"estimator": "x"})
    size = table.uniform_cost("int2", "size_bytes") * 1.01
    latency = float(frame.groupby("layer")["latency"].min().sum()) * 1.01
    Problem(t2, Budget(size_bytes=size))
    Problem(t2, Budget(latency=latency))
    both = Problem(t2, Budget(size_bytes=size, latency=latency))
    for solver in (ILP(), BruteForce()):
        with pytest.raises(InfeasibleBudgetError, match="no plan meets all constraints"):
            solver.solve(both)


def test_result_plan_carries_provenance():
    table = random_table(3, 2)
    result = DP().solve(Problem(table, Budget(avg_bits=5.0)))
    prov = result.plan.provenance
    assert prov["solver"] == "dp" and prov["budget"]["avg_bits"] == 5.0
    assert prov["table_fingerprint"] == table.fingerprint()
    assert prov["solver_params"] == {"max_buckets": 1 << 20, "max_cells": 1 << 28}
