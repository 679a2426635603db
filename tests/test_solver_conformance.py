"""One conformance suite run against every solver (and the Pareto front)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_solvers import random_table

from mpsearch.core import Budget, InfeasibleBudgetError
from mpsearch.testing import solver_instances
from solvers import DP, REGISTRY, BruteForce, Greedy, Pareto, Problem

ALL = solver_instances()  # every registered solver: a new one cannot escape this suite
EXACT = [s for s in ALL if s.exact and not isinstance(s, BruteForce)]


def test_registry_is_covered():
    assert {s.name for s in ALL} == set(REGISTRY)
    assert {s.name for s in EXACT} == {"dp", "core", "ilp"}


ids = lambda s: f"{s.name}-{getattr(s, 'backend', '')}"  # noqa: E731


def problem_for(seed: int, n: int, ties=(), two=False) -> Problem:
    rng = np.random.default_rng(seed)
    table = random_table(n, seed, ties)
    if two:
        size = (table.uniform_cost("int2", "size_bytes") + table.uniform_cost("int8", "size_bytes")) / 2
        bops = (table.uniform_cost("int2", "bops") + table.uniform_cost("int8", "bops")) / 2
        return Problem(table, Budget(size_bytes=size * rng.uniform(0.8, 1.2), bops=bops * rng.uniform(0.9, 1.3)))
    lo, hi = table.uniform_cost("int2"), table.uniform_cost("int8")
    return Problem(table, Budget(avg_bits=float(rng.uniform(lo + 0.3, hi - 0.5))))


@pytest.mark.parametrize("solver", ALL, ids=ids)
@pytest.mark.parametrize("seed", range(4))
def test_budget_respected_one_option_per_layer_and_ties(solver, seed):
    ties = [("net.0.proj", "net.2.proj")]
    problem = problem_for(seed, 6, ties, two=not isinstance(solver, DP) and seed % 2 == 1)
    result = solver.solve(problem)
    assert set(result.plan) == set(problem.table.layers)  # exactly one option for every layer
    for layer, option in result.plan.items():
        assert option in problem.table.options_for(layer)
    assert all(c.slack >= -1e-9 * abs(c.limit) for c in result.constraints.values())
    assert result.plan["net.0.proj"] == result.plan["net.2.proj"]
    frame = result.plan.to_frame(problem.table)
    assert result.objective == pytest.approx(frame["damage"].sum())


@pytest.mark.parametrize("solver", ALL, ids=ids)
def test_infeasible_raises(solver):
    table = random_table(4, 1)
    frame = table.frame.assign(latency=1.0 / table.frame["bits"])
    from mpsearch.core import CostTable

    t2 = CostTable(frame, {})
    size = table.uniform_cost("int2", "size_bytes") * 1.01
    latency = float(frame.groupby("layer")["latency"].min().sum()) * 1.01
    budget = Budget(size_bytes=size, latency=latency)
    if isinstance(solver, DP):
        budget = Budget(avg_bits=1.0)
        with pytest.raises(InfeasibleBudgetError):
            solver.solve(Problem(t2, budget))
        return
    with pytest.raises(InfeasibleBudgetError):
        solver.solve(Problem(t2, budget))


@pytest.mark.parametrize("solver", ALL, ids=ids)
def test_same_input_same_plan(solver):
    problem = problem_for(7, 8)
    assert solver.solve(problem).plan == solver.solve(problem).plan


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7), tie=st.booleans(), two=st.booleans())
def test_exact_solvers_equal_brute_force(seed, n, tie, two):
    ties = [("net.0.proj", "net.1.proj")] if tie and n >= 2 else ()
    problem = problem_for(seed, n, ties, two=two)
    try:
        oracle = BruteForce().solve(problem)
    except InfeasibleBudgetError:
        for solver in EXACT[1:]:
            with pytest.raises(InfeasibleBudgetError):
                solver.solve(problem)
        return
    for solver in EXACT:
        if isinstance(solver, DP) and two:
            continue
        result = solver.solve(problem)
        assert result.status == "optimal"
        tol = 1e-6 if solver.name == "ilp" and solver.backend == "cpsat" else 1e-9  # cpsat: 1e9 integer steps
        assert result.objective == pytest.approx(oracle.objective, rel=tol, abs=1e-12)


def test_greedy_is_never_better_than_the_optimum():
    for seed in range(10):
        problem = problem_for(seed, 7)
        assert Greedy().solve(problem).objective >= DP().solve(problem).objective - 1e-15


@pytest.mark.parametrize("two,budgets", [(False, None), (True, None), (False, 9)])
def test_pareto_points_are_nondominated_and_reproduce_their_costs(two, budgets):
    problem = problem_for(3, 6, two=two)
    front = Pareto(budgets=budgets).solve(problem)
    frame = front.to_frame()
    axes = front.axes
    assert len(frame) >= 3 and front.meta["exact"]
    values = frame[[*axes, "damage"]].to_numpy()
    for i, p in enumerate(values):
        others = np.delete(values, i, axis=0)
        assert not np.any(np.all(others <= p, axis=1)), "a point is dominated"
    for _, row in frame.iterrows():
        plan = front.plans[int(row.plan_id)]
        realized = plan.to_frame(problem.table)
        assert realized["damage"].sum() == pytest.approx(row.damage)
        if "avg_bits" in axes:
            avg = (realized.bits * realized.n_params).sum() / realized.n_params.sum()
            assert avg == pytest.approx(row.avg_bits)
        if "size_bytes" in axes:
            assert realized["size_bytes"].sum() == pytest.approx(row.size_bytes)


def test_pareto_front_contains_every_budget_optimum():
    problem = problem_for(5, 6)
    front = Pareto().solve(problem)
    table = problem.table
    lo, hi = table.uniform_cost("int2"), problem.constraints[0].report(problem.constraints[0].limit)
    for limit in np.linspace(lo, hi, 9):
        best = BruteForce().solve(Problem(table, Budget(avg_bits=float(limit))))
        at = front.plan_at(avg_bits=float(limit))
        assert at.to_frame(table)["damage"].sum() == pytest.approx(best.objective, rel=1e-9)
