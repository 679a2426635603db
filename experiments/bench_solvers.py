"""Solver speed and objective against PuLP + CBC on the same problem in the same run.

Two baselines: ``cbc-default`` is PuLP + CBC as users call it (``PULP_CBC_CMD()`` defaults: fast, but it stops
at CBC's own cutoff increment, above the optimum), ``cbc-tight`` is mpsearch's ILP("cbc") (gapRel 1e-9,
increment 1e-12: the optimum, slowly). Prints one JSON object per line:

  kind=stages  n_layers, table_s (building the CostTable), problem_s (solvers.Problem), solve_s (CoreDP),
               problem_solve_s, total_s: the end-to-end cost at 20000 and 1M layers (--stage-sizes)
  kind=solver  per (solver, n_layers, constraints): wall_s (solve only), objective, status, gap, and for each
               baseline (default first) its wall_s, objective, speedup (its wall / this wall) and
               rel_objective_diff (this - it) / |it|; then
objects for the Pareto front of a 1000-layer problem: front_points, wall_s, exact, complete — the exact
optima at ``--front-budgets`` budgets plus the hull vertices (solvers.Pareto(budgets=N)), and the complete
front by the integerized DP at ``--front-buckets`` (exact only at the costs' own resolution:
``--front-buckets 0``, about 30 s here).

Problems: layers with transformer/CNN-like shapes (multiples of 64), 7 options, damage ~ s_l * 4^-bits
with per-(layer, option) noise; budgets halfway between the all-int2 and all-int8 plans.

    python experiments/bench_solvers.py [--sizes 50 500 5000] [--time-limit 600] [--stage-sizes 20000 1000000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import solvers.ilp  # noqa: F401  (imports OR-Tools first; see solvers/ilp.py)
from mpsearch.core import Budget, CostTable, LayerInfo, cost_rows, parse_options
from solvers import DP, ILP, CoreDP, Greedy, Pareto, Problem

OPTIONS = parse_options(["int2", "int3", "int4", "int5", "int6", "int8", "fp16"])


def make_table(n_layers: int, seed: int = 0) -> CostTable:
    rng = np.random.default_rng(seed)
    dims = rng.choice([64, 128, 256, 384, 512, 768, 1024], size=(n_layers, 2)).tolist()
    macs = rng.integers(1, 64, size=n_layers).tolist()
    layers = [
        LayerInfo(f"blocks.{i}.proj", (o, k), "linear", macs=o * k * m) for i, ((o, k), m) in enumerate(zip(dims, macs))
    ]
    frame = cost_rows(layers, OPTIONS)
    sens = rng.lognormal(sigma=1.5, size=n_layers)
    bits = np.tile([float(o.bits) for o in OPTIONS], n_layers)
    noise = rng.uniform(0.7, 1.3, len(frame))
    frame["damage"] = np.repeat(sens, len(OPTIONS)) * 4.0 ** (-bits) * noise
    return CostTable(frame, {"estimator": "synthetic", "seed": seed})


class DefaultCBC(ILP):
    """PuLP + CBC with PULP_CBC_CMD's defaults: what a user who writes the ILP with PuLP gets."""

    def _cbc_command(self, pulp, limit=None):
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=limit)


def stages(n_layers: int) -> dict:
    """Wall time of each stage of a search from per-layer costs: table, Problem, CoreDP's solve."""
    start = time.perf_counter()
    table = make_table(n_layers)
    budget = budget_for(table, False)
    built = time.perf_counter()
    problem = Problem(table, budget)
    compiled = time.perf_counter()
    result = CoreDP().solve(problem)
    done = time.perf_counter()
    return {
        "kind": "stages",
        "n_layers": n_layers,
        "n_options": len(OPTIONS),
        "table_s": round(built - start, 3),
        "problem_s": round(compiled - built, 3),
        "solve_s": round(done - compiled, 3),
        "problem_solve_s": round(done - built, 3),
        "total_s": round(done - start, 3),
        "status": result.status,
    }


def budget_for(table: CostTable, two: bool) -> Budget:
    if not two:
        return Budget(avg_bits=(table.uniform_cost("int2") + table.uniform_cost("int8")) / 2)
    mid = lambda col: (table.uniform_cost("int2", col) + table.uniform_cost("int8", col)) / 2  # noqa: E731
    return Budget(size_bytes=mid("size_bytes"), bops=mid("bops") * 1.1)


def timed(solver, problem):
    start = time.perf_counter()
    result = solver.solve(problem)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[50, 500, 5000])
    p.add_argument("--time-limit", type=float, default=600)
    p.add_argument("--front-layers", type=int, default=1000)
    p.add_argument("--front-budgets", type=int, default=200, help="budgets solved exactly for the sampled front")
    p.add_argument("--front-buckets", type=int, default=8192, help="DP resolution of the complete front; 0: exact")
    p.add_argument("--front-only", action="store_true")
    p.add_argument("--stage-sizes", nargs="*", type=int, default=[20000, 1_000_000])
    p.add_argument("--one-constraint-only", action="store_true", help="skip the two-constraint problems")
    args = p.parse_args(argv)
    for n in [] if args.front_only else args.stage_sizes:
        print(json.dumps(stages(n)), flush=True)
    for two in () if args.front_only else (False,) if args.one_constraint_only else (False, True):
        for n in args.sizes:
            problem = Problem(make_table(n), budget_for(make_table(n), two))
            baselines = {
                "cbc-default": timed(DefaultCBC(time_limit=args.time_limit), problem),
                "cbc-tight": timed(ILP("cbc", time_limit=args.time_limit), problem),
            }
            candidates = [CoreDP(), ILP("highs"), ILP("cpsat", time_limit=args.time_limit), Greedy()]
            if not two:
                candidates.insert(1, DP())
            for solver in candidates:
                result, wall = timed(solver, problem)
                name = solver.name + (f"-{solver.backend}" if hasattr(solver, "backend") else "")
                row = {
                    "kind": "solver",
                    "solver": name,
                    "n_layers": n,
                    "n_options": len(OPTIONS),
                    "constraints": list(problem.budget.limits()),
                    "wall_s": wall,
                    "objective": result.objective,
                    "status": result.status,
                    "gap": result.gap,
                }
                for label, (base, base_s) in baselines.items():
                    row[label] = {
                        "wall_s": base_s,
                        "objective": base.objective,
                        "status": base.status,
                        "speedup": base_s / wall,
                        "rel_objective_diff": (result.objective - base.objective) / abs(base.objective),
                    }
                print(json.dumps(row), flush=True)
    table = make_table(args.front_layers, seed=1)
    problem = Problem(table, Budget(avg_bits=table.uniform_cost("fp16")))
    fronts = [("pareto-sampled", Pareto(budgets=args.front_budgets), {"budgets": args.front_budgets})]
    buckets = args.front_buckets or 1 << 40
    fronts.append(("pareto-complete", Pareto(max_buckets=buckets, max_cells=1 << 40), {"buckets": args.front_buckets}))
    for name, solver, params in fronts:
        start = time.perf_counter()
        front = solver.solve(problem)
        row = {"solver": name, "n_layers": args.front_layers, "n_options": len(OPTIONS), "front_points": len(front)}
        row.update(wall_s=time.perf_counter() - start, exact=front.meta["exact"], complete=front.meta["complete"])
        print(json.dumps({**row, **params}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
