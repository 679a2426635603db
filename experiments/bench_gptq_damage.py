"""What the Fisher damage of GPTQ's errors with their cross-column terms costs, on smollm2-135m.

The Fisher estimate with a GPTQ quantizer, ``cross_terms=True`` (the default: each linear row's cross terms
through its inputs' Hessian, shrunk) against ``cross_terms=False`` (the diagonal alone, the baseline), each
in its own child process so its peak memory is its own. The GPTQ quantizer (its Hessians and factors) is
built before the memory reset and timed apart: both arms pay it. Prints one JSON object per line (and
appends them to --out):

  kind=estimate  cross_terms, gptq_s (building the quantizer), wall_s (the estimate), peak_rss_bytes (VmHWM
                 after a reset once the quantizer was built), loaded_rss_bytes, peak_over_loaded_bytes
  kind=ratio     wall, peak RSS and peak-over-loaded of cross_terms=True over cross_terms=False (the
                 process's RSS once loaded varies by hundreds of MB between runs, so read the peak too)

    python experiments/bench_gptq_damage.py      # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from memory import PeakMemory, emit_rows, run_child  # experiments/memory.py

MODEL, N_CALIB = "smollm2-135m", 16


def child(cross_terms: bool) -> dict:
    import mpsearch
    from mpsearch.quant.gptq import GPTQ

    zoo = mpsearch.load_model(MODEL, n_calib=N_CALIB, n_eval=1)
    start = time.perf_counter()
    quantizer = GPTQ(zoo.model, zoo.calibration)
    gptq_s = time.perf_counter() - start
    memory = PeakMemory("cpu")
    loaded = memory.now()
    memory.reset()
    params = {"cross_terms": cross_terms, "progress": False}
    start = time.perf_counter()
    mpsearch.estimate(
        zoo.model,
        zoo.calibration,
        "fisher",
        list(zoo.options),
        estimator_params=params,
        cache=False,
        quantizer=quantizer,
    )
    wall = time.perf_counter() - start
    peak = memory.peak()
    return {
        "kind": "estimate",
        "model": MODEL,
        "calibration": N_CALIB,
        "cross_terms": cross_terms,
        "options": len(zoo.options),
        "gptq_s": round(gptq_s, 2),
        "wall_s": round(wall, 2),
        "peak_rss_bytes": peak,
        "loaded_rss_bytes": loaded,
        "peak_over_loaded_bytes": peak - loaded,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results_gptq_damage.jsonl")
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "on")), flush=True)
        return 0
    off, on = (run_child([sys.executable, __file__, "--child", arm]) for arm in ("off", "on"))  # the baseline first
    ratio = {
        "kind": "ratio",
        "model": MODEL,
        "wall_on_over_off": round(on["wall_s"] / off["wall_s"], 3),
        "peak_rss_on_over_off": round(on["peak_rss_bytes"] / off["peak_rss_bytes"], 3),
        "peak_over_loaded_on_over_off": round(on["peak_over_loaded_bytes"] / max(off["peak_over_loaded_bytes"], 1), 3),
    }
    emit_rows(args.out, [off, on, ratio])
    return 0


if __name__ == "__main__":
    sys.exit(main())
