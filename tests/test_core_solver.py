"""CoreDP (Lagrangian reduction + exact core DP), its relaxation, and the sampled Pareto front, against
brute force and analytic facts."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from mpsearch.core import Budget, MpsearchError
from solvers import ILP, BruteForce, CoreDP, Pareto, Problem
from solvers.core import Arrays, relax, search_core, undominated
from solvers.lagrange import Hull, _concave_max, lagrangian

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def random_arrays(rng, n_con=None):
    """A random MCKP in Arrays form: ties in damage and weights, some options unavailable."""
    n, m, k = int(rng.integers(1, 7)), int(rng.integers(1, 5)), n_con or int(rng.integers(1, 4))
    d = rng.uniform(0, 1, (n, m)) ** 3
    if rng.random() < 0.3:
        d = np.round(d * 4) / 4
    w = rng.uniform(0, 1, (k, n, m))
    if rng.random() < 0.3:
        w = np.round(w * 3) / 3
    if m > 1 and rng.random() < 0.3:
        d[rng.integers(n), rng.integers(m)] = np.inf
    ok = np.isfinite(d)[None]
    base = np.where(ok, w, np.inf).min(axis=2)
    w = np.where(ok, w - base[..., None], 0.0)
    cap = rng.uniform(0, 1, k) * w.max(axis=2).sum(axis=1)
    return Arrays(d, w, cap, np.full(k, 1e-12))


def brute(a: Arrays) -> float:
    n, m = a.d.shape
    best = np.inf
    for combo in itertools.product(range(m), repeat=n):
        choice = np.array(combo)
        if np.all(np.isfinite(a.d[np.arange(n), choice])) and a.fits(choice):
            best = min(best, a.damage_of(choice))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_core_equals_brute_force_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        a = random_arrays(rng)
        optimum = brute(a)
        lam, lb, incumbent = relax(a)
        if not np.isfinite(optimum):
            with pytest.raises(Exception, match="no plan meets"):
                search_core(a, lam, lb, incumbent, 1 << 20)
            continue
        assert lb <= optimum + 1e-12  # weak duality
        choice, exact, _, _ = search_core(a, lam, lb, incumbent, 1 << 20)
        assert exact and a.fits(choice)
        assert a.damage_of(choice) == pytest.approx(optimum, rel=1e-12, abs=1e-15)


def test_lagrangian_is_a_lower_bound_for_any_multipliers():
    rng = np.random.default_rng(1)
    for _ in range(100):
        a = random_arrays(rng)
        optimum = brute(a)
        if np.isfinite(optimum):
            lam = rng.exponential(size=a.w.shape[0]) * rng.choice([0.0, 1.0, 10.0])
            assert lagrangian(a.d, a.w, a.cap, lam)[0] <= optimum + 1e-12


def test_every_hull_vertex_is_optimal_for_its_own_weight():
    rng = np.random.default_rng(2)
    for _ in range(40):
        a = random_arrays(rng, n_con=1)
        hull = Hull.of(a.d, a.w[0])
        assert np.all(np.diff(hull.slope) <= 0)  # best slope first
        for t in range(len(hull.dw) + 1):
            plan = hull.plan(t)
            weight = float(a.w[0][np.arange(len(plan)), plan].sum())
            at = Arrays(a.d, a.w, np.array([weight]), a.tol)
            assert a.damage_of(plan) == pytest.approx(brute(at), rel=1e-12, abs=1e-15)


def test_state_cap_gives_a_feasible_plan_with_an_honest_gap():
    from bench_solvers import budget_for, make_table

    table = make_table(300, seed=3)
    problem = Problem(table, budget_for(table, two=False))
    optimum = CoreDP().solve(problem)
    capped = CoreDP(max_states=2).solve(problem)
    assert optimum.status == "optimal" and capped.status == "feasible"  # 2 states cannot prove the optimum
    assert capped.objective >= optimum.objective - 1e-12
    assert capped.extra["lower_bound"] <= optimum.objective
    assert capped.gap >= (capped.objective - optimum.objective) / capped.objective - 1e-12


@pytest.mark.parametrize("two", [False, True])
def test_core_matches_cbc_on_a_500_layer_problem(two):
    # also guards ILP("cbc")'s "increment" option: without it CBC returned a plan 1.8e-4 worse as "optimal"
    from bench_solvers import budget_for, make_table

    table = make_table(500)
    problem = Problem(table, budget_for(table, two))
    core, cbc = CoreDP().solve(problem), ILP("cbc").solve(problem)
    assert core.status == cbc.status == "optimal"
    assert core.objective == pytest.approx(cbc.objective, rel=1e-9)
    assert core.extra["core_units"] < 200  # the reduction fixed most of the 500 units


def test_undominated_matches_pairwise_comparison():
    rng = np.random.default_rng(4)
    for _ in range(200):
        n, cols = int(rng.integers(1, 60)), int(rng.integers(0, 3))
        damage = np.round(rng.uniform(0, 5, n))
        weights = np.round(rng.uniform(0, 5, (n, cols)))
        points = np.column_stack([damage, weights])
        kept = points[undominated(damage, weights)]
        expected = {tuple(p) for p in points if not any(np.all(q <= p) and np.any(q < p) for q in points)}
        assert {tuple(p) for p in kept} == expected and len(kept) == len(expected)  # one of equal points


def test_concave_max_finds_the_kink_of_a_piecewise_linear_function():
    kinks = np.array([0.0, 0.5, 2.0, 7.5, 40.0])
    values = np.array([0.0, 2.0, 3.5, 3.9, -10.0])
    slopes = np.diff(values) / np.diff(kinks)

    def f(x):
        i = min(int(np.searchsorted(kinks, x, side="right")) - 1, len(slopes) - 1)
        return values[i] + slopes[i] * (x - kinks[i]), slopes[i]

    assert _concave_max(f, scale=1.0) == pytest.approx(7.5, rel=1e-9)
    assert _concave_max(lambda x: (-x, -1.0), scale=1.0) == 0.0


def test_sampled_front_points_are_budget_optima():
    from test_solver_conformance import problem_for

    problem = problem_for(11, 6)
    front = Pareto(budgets=7).solve(problem)
    assert front.meta["exact"] and not front.meta["complete"]
    table = problem.table
    for _, row in front.to_frame().iterrows():
        best = BruteForce().solve(Problem(table, Budget(avg_bits=float(row.avg_bits) + 1e-9)))
        assert row.damage == pytest.approx(best.objective, rel=1e-9)
    with pytest.raises(MpsearchError, match="budgets.*got 1"):
        Pareto(budgets=1).solve(problem)
    with pytest.raises(MpsearchError, match="one cost axis"):
        Pareto(budgets=5).solve(problem_for(11, 6, two=True))
