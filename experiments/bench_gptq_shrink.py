"""What solving GPTQ against its cross-validated shrunk Hessian costs and buys (``GPTQ(shrink=True)``, the
default) against the reference's sample Hessian (``shrink=False``, the baseline), per zoo model.

Each arm runs in its own child process so its peak memory is its own: build the GPTQ quantizer (timed; peak
RSS over the loaded model), then the held-out loss of uniform plans GPTQ'd with it. Prints one JSON object
per line (and appends them to --out):

  kind=build   model, shrink, calibration samples, gptq_s, peak_over_loaded_bytes, distinct inputs, tokens
               per input (min), shrinkage chosen per input (how many 0, rho/2, rho; median rho), and
               loss_<option> (held-out, as bench_quality measures it) for each --options
  kind=ratio   gptq_s, peak and each loss of shrink=True over shrink=False

    python experiments/bench_gptq_shrink.py                                  # smollm2-135m, ~6 min on 2 cores
    python experiments/bench_gptq_shrink.py --models minilm-l6 --n-calib 32 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from memory import PeakMemory, emit_rows, run_child  # experiments/memory.py

OPTIONS = ["int4", "int3_g64_asym"]


def child(model: str, n_calib: int | None, shrink: bool, options: list[str]) -> dict:
    import mpsearch
    from mpsearch.data import n_samples
    from mpsearch.quant.gptq import GPTQ

    zoo = mpsearch.load_model(model, n_calib=n_calib)
    memory = PeakMemory("cpu")
    loaded = memory.now()
    memory.reset()
    start = time.perf_counter()
    quantizer = GPTQ(zoo.model, zoo.calibration, shrink=shrink)
    gptq_s = time.perf_counter() - start
    peak = memory.peak()
    factors = list({id(f): f for f in quantizer.factors.values()}.values())  # one per distinct input
    fractions = [round(f.solved / f.rho, 2) if f.rho > 0 else 0.0 for f in factors]
    row = {
        "kind": "build",
        "model": model,
        "shrink": shrink,
        "calibration": sum(n_samples(b) for b in zoo.calibration),
        "gptq_s": round(gptq_s, 2),
        "peak_over_loaded_bytes": peak - loaded,
        "inputs": len(factors),
        "solved_fraction_counts": {str(c): fractions.count(c) for c in sorted(set(fractions))},
        "median_rho": round(statistics.median(f.rho for f in factors), 4),
    }
    for option in options:
        plan = mpsearch.uniform_plan(zoo.model, option)
        measured = mpsearch.evaluate(zoo.model, plan, zoo.evaluation, zoo.loss, quantizer=quantizer, uniform=False)
        row[f"loss_{option}"] = measured["loss"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--n-calib", nargs="+", type=int, default=[None], help="calibration samples (default the zoo's)")
    p.add_argument("--options", nargs="+", default=OPTIONS)
    p.add_argument("--out", default="experiments/results_gptq_shrink.jsonl")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # model, n_calib, on|off, options (comma list)
    args = p.parse_args(argv)
    if args.child:
        model, n_calib, arm, options = args.child
        row = child(model, int(n_calib) if n_calib != "None" else None, arm == "on", options.split(","))
        print(json.dumps(row), flush=True)
        return 0
    for model in args.models:
        for n_calib in args.n_calib:
            off, on = (  # the baseline first
                run_child([sys.executable, __file__, "--child", model, str(n_calib), arm, ",".join(args.options)])
                for arm in ("off", "on")
            )
            ratio = {
                "kind": "ratio",
                "model": model,
                "calibration": on["calibration"],
                "gptq_s_on_over_off": round(on["gptq_s"] / off["gptq_s"], 3),
                "peak_on_over_off": round(on["peak_over_loaded_bytes"] / max(off["peak_over_loaded_bytes"], 1), 3),
                **{f"{k}_on_over_off": round(on[k] / off[k], 4) for k in on if k.startswith("loss_")},
            }
            emit_rows(args.out, [off, on, ratio])
    return 0


if __name__ == "__main__":
    sys.exit(main())
