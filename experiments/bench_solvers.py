"""Solver speed and objective against PuLP + CBC on the same problem in the same run.

Prints one JSON object per (solver, n_layers, constraints): solver, n_layers, n_options, constraints,
wall_s, objective, status, gap, baseline_wall_s, baseline_objective, speedup, rel_objective_diff; then
objects for the Pareto front of a 1000-layer problem: front_points, wall_s, exact, complete — the exact
optima at ``--front-budgets`` budgets plus the hull vertices (solvers.Pareto(budgets=N)), and the complete
front by the integerized DP at ``--front-buckets`` (exact only at the costs' own resolution:
``--front-buckets 0``, about 30 s here).

Problems: layers with transformer/CNN-like shapes (multiples of 64), 7 options, damage ~ s_l * 4^-bits
with per-(layer, option) noise; budgets halfway between the all-int2 and all-int8 plans.

    python experiments/bench_solvers.py [--sizes 50 500 5000] [--time-limit 600]
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
    dims = rng.choice([64, 128, 256, 384, 512, 768, 1024], size=(n_layers, 2))
    layers = [
        LayerInfo(f"blocks.{i}.proj", (int(o), int(k)), "linear", macs=int(o * k * rng.integers(1, 64)))
        for i, (o, k) in enumerate(dims)
    ]
    frame = cost_rows(layers, OPTIONS)
    sens = rng.lognormal(sigma=1.5, size=n_layers)
    bits = frame["option"].map(lambda o: 16 if o == "fp16" else int(o[3:])).to_numpy()
    noise = rng.uniform(0.7, 1.3, len(frame))
    frame["damage"] = np.repeat(sens, len(OPTIONS)) * 4.0 ** (-bits.astype(float)) * noise
    return CostTable(frame, {"estimator": "synthetic", "seed": seed})


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
    args = p.parse_args(argv)
    for two in () if args.front_only else (False, True):
        for n in args.sizes:
            problem = Problem(make_table(n), budget_for(make_table(n), two))
            base, base_s = timed(ILP("cbc", time_limit=args.time_limit), problem)
            candidates = [CoreDP(), ILP("highs"), ILP("cpsat", time_limit=args.time_limit), Greedy()]
            if not two:
                candidates.insert(1, DP())
            for solver in candidates:
                result, wall = timed(solver, problem)
                name = solver.name + (f"-{solver.backend}" if hasattr(solver, "backend") else "")
                print(
                    json.dumps(
                        {
                            "solver": name,
                            "n_layers": n,
                            "n_options": len(OPTIONS),
                            "constraints": list(problem.budget.limits()),
                            "wall_s": wall,
                            "objective": result.objective,
                            "status": result.status,
                            "gap": result.gap,
                            "baseline_wall_s": base_s,
                            "baseline_objective": base.objective,
                            "baseline_status": base.status,
                            "speedup": base_s / wall,
                            "rel_objective_diff": (result.objective - base.objective) / abs(base.objective),
                        }
                    ),
                    flush=True,
                )
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
