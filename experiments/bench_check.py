"""The measured check's cost against the estimate's, on smollm2-135m (issue 23: the check at most half the time
of the estimate), in one process: every batch of every move measured ("plain"), a move stopped once its even
fold rejects it ("early_stop"), and that plus the block replay of ``mpsearch.replay`` ("early_stop+replay",
the default).

One search context (default estimator, ``core``, avg 4 bits, the zoo's calibration split): the estimate is
timed once; then the check (``mpsearch.safety.safeguard``: the searched plan, up to 16 refinement moves and
every uniform option within the budget) in each arm, on a fresh fitness. All must choose the same plan with
the same losses. One JSON object per line (also appended to --out):

  kind=check  model, estimate_s, check_s and ratio (check / estimate) per arm, speedup (plain / default),
              evaluations, same_result, target_ratio, peak_rss_bytes

    python experiments/bench_check.py [--model smollm2-135m] [--out experiments/results_check.jsonl]
"""

from __future__ import annotations

import argparse
import sys
import time

from memory import emit_rows, rss  # experiments/memory.py

ARMS = ("plain", "early_stop", "early_stop+replay")  # what PlanFitness does for the check in each arm


class _AllBatches:
    """The fitness without the early stop: every batch of every move measured (as before it existed)."""

    def __init__(self, fitness) -> None:
        self.fitness = fitness

    def losses(self, plan):
        return self.fitness.losses(plan)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--avg-bits", type=float, default=4.0)
    p.add_argument("--out", default="experiments/results_check.jsonl")
    args = p.parse_args(argv)

    import mpsearch
    from mpsearch.context import SearchContext
    from mpsearch.fitness import PlanFitness
    from mpsearch.safety import safeguard

    ctx = SearchContext.resolve(args.model, budget=mpsearch.Budget(avg_bits=args.avg_bits), solver="core", cache=False)
    start = time.perf_counter()
    table = ctx.estimate()
    estimate_s = time.perf_counter() - start
    result = ctx.solve(table)
    problem = result.extra.pop("problem")
    timings, outcomes = {}, {}
    for arm in ARMS:
        start = time.perf_counter()
        fitness = PlanFitness(
            ctx.model, ctx.check, ctx.measure_loss(table), ctx.output_fn, ctx.quantizer_for(), "replay" in arm
        )
        checked = safeguard(
            problem, result, fitness if "early" in arm else _AllBatches(fitness), ctx.refine, progress=False
        )
        timings[arm] = round(time.perf_counter() - start, 2)
        outcomes[arm] = (checked.plan.assignments, checked.extra["safety"]["refined_loss"])
    row = {
        "kind": "check",
        "model": args.model,
        "avg_bits": args.avg_bits,
        "estimator": table.meta["estimator"],
        "estimate_s": round(estimate_s, 2),
        "check_s": timings,
        "ratio": {arm: round(t / estimate_s, 3) for arm, t in timings.items()},
        "speedup": round(timings[ARMS[0]] / timings[ARMS[-1]], 2),
        "evaluations": fitness.calls,
        "same_result": all(o == outcomes[ARMS[0]] for o in outcomes.values()),
        "target_ratio": 0.5,
        "peak_rss_bytes": rss("VmHWM"),
    }
    emit_rows(args.out, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
