"""The measured check's cost against the estimate's, on smollm2-135m (issue 23: the check at most half the time
of the estimate), with the block replay of ``mpsearch.replay`` on and off, in one process.

One search context (default estimator, ``core``, avg 4 bits, the zoo's calibration split): the estimate is
timed once; then the check (``mpsearch.safety.safeguard``: the searched plan, up to 16 refinement moves and
every uniform option within the budget) is timed with ``PlanFitness(replay=False)`` and ``replay=True``, each
on a fresh fitness. Both must choose the same plan with the same losses (replay is bit-identical). One JSON
object per line (also appended to --out):

  kind=check  model, estimate_s, check_s_full, check_s_replay, ratio_full / ratio_replay (check / estimate),
              speedup (full / replay), evaluations, same_result, peak_rss_bytes

    python experiments/bench_check.py [--model smollm2-135m] [--out experiments/results_check.jsonl]
"""

from __future__ import annotations

import argparse
import sys
import time

from memory import emit_rows, rss  # experiments/memory.py


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
    for replay in (False, True):
        start = time.perf_counter()
        fitness = PlanFitness(ctx.model, ctx.check, ctx.measure_loss(table), ctx.output_fn, ctx.quantizer_for(), replay)
        checked = safeguard(problem, result, fitness, ctx.refine, progress=False)
        timings[replay] = time.perf_counter() - start
        outcomes[replay] = (checked.plan.assignments, checked.extra["safety"]["refined_loss"], fitness.calls)
    row = {
        "kind": "check",
        "model": args.model,
        "avg_bits": args.avg_bits,
        "estimator": table.meta["estimator"],
        "estimate_s": round(estimate_s, 2),
        "check_s_full": round(timings[False], 2),
        "check_s_replay": round(timings[True], 2),
        "ratio_full": round(timings[False] / estimate_s, 3),
        "ratio_replay": round(timings[True] / estimate_s, 3),
        "speedup": round(timings[False] / timings[True], 2),
        "evaluations": outcomes[True][2],
        "same_result": outcomes[False] == outcomes[True],
        "target_ratio": 0.5,
        "peak_rss_bytes": rss("VmHWM"),
    }
    emit_rows(args.out, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
