"""How additive is predicted damage? And does Evolutionary (real-model fitness) improve on the DP plan?

For one zoo model and budget: build the estimator's table, draw --plans near-optimal plans (DP on the table
with each damage multiplied by log-normal noise, seeded), measure each plan's real calibration loss, and
report Kendall tau between table-predicted and measured damage. Then run Evolutionary from the DP plan for
--trials trials and report the calibration loss and held-out metric of both plans. One JSON line each.

    python experiments/additivity.py --model minilm-l6 --avg-bits 3.5 --estimator fisher --plans 50 --trials 150
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
from scipy.stats import kendalltau

import solvers.ilp  # noqa: F401  (OR-Tools first)
from mpsearch import Budget, estimate, evaluate
from mpsearch.core import CostTable
from mpsearch.fitness import PlanFitness
from mpsearch.models import load
from solvers import DP, Evolutionary, Problem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--avg-bits", type=float, default=3.5)
    p.add_argument("--estimator", default="fisher")
    p.add_argument("--plans", type=int, default=50)
    p.add_argument("--trials", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    zoo = load(args.model)
    table = estimate(zoo.model, zoo.calibration, args.estimator, loss_fn=zoo.loss, estimator_params={"progress": False})
    budget = Budget(avg_bits=args.avg_bits)
    fitness = PlanFitness(zoo.model, zoo.calibration, zoo.loss)
    rng = np.random.default_rng(args.seed)
    predicted, measured = [], []
    for _ in range(args.plans):
        noisy = table.frame.assign(damage=table.frame["damage"] * rng.lognormal(0, 1.0, len(table.frame)))
        plan = DP().solve(Problem(CostTable(noisy, table.meta), budget)).plan
        predicted.append(float(plan.to_frame(table)["damage"].sum()))
        measured.append(fitness(plan))
    tau = kendalltau(predicted, measured).statistic
    print(
        json.dumps(
            {
                "model": args.model,
                "estimator": args.estimator,
                "avg_bits": args.avg_bits,
                "plans": args.plans,
                "kendall_tau": float(tau),
            }
        ),
        flush=True,
    )
    problem = Problem(table, budget)
    dp = DP().solve(problem)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        evo = Evolutionary(fitness, n_trials=args.trials, run_dir=run_dir, seed=args.seed).solve(problem)
    wall = time.perf_counter() - start
    for name, result in (("dp", dp), ("evolutionary", evo)):
        held_out = evaluate(zoo.model, result.plan, zoo.evaluation, zoo.loss, uniform=False)
        print(
            json.dumps(
                {
                    "model": args.model,
                    "plan": name,
                    "avg_bits": held_out["avg_bits"],
                    "calibration_loss": fitness(result.plan),
                    "metric_name": held_out["metric_name"],
                    "heldout_metric": held_out["metric"],
                    "wall_s": wall if name != "dp" else dp.wall_time_s,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
