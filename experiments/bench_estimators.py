"""Estimator fidelity and cost: rank correlation of each estimator's per-layer damage with Measured damage.

Prints one JSON object per (model, estimator):
  model, estimator, spearman_vs_measured (4 bits), spearman_3bit, wall_s, n_calib
and for hessian also hvps, hvp_s, trace_s, overhead_vs_bare_hvps (trace_s / (hvps x one bare whole-model
HVP)), and per_layer_loop_ratio = (time of a one-layer-at-a-time Hutchinson loop with the same probes) /
(time of the shared-HVP traces). The loop is timed on --loop-layers layers x --loop-probes probes and
extrapolated to every layer and every probe (each loop HVP is a whole-model HVP with a probe supported on
one layer, so its cost does not depend on which layer).

    python experiments/bench_estimators.py                  # all zoo models
    python experiments/bench_estimators.py --models digits-cnn --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from scipy.stats import spearmanr

from mpsearch.models import load
from mpsearch.outputs import resolve_objective
from sensitivity import REGISTRY, HessianTrace, Measured
from sensitivity.base import trainable_weights
from sensitivity.hessian import HessianVectorProduct
from sensitivity.hutchinson import rademacher

CALIB = {"digits-cnn": 256, "minilm-l6": 32, "efficientnet-lite0": 8}
OPTIONS = ["int3", "int4"]


def per_layer(table, option):
    f = table.frame[table.frame.option == option].set_index("layer")["damage"]
    return f


def loop_hvp_seconds(model, batches, loss, n_layers: int, n_probes: int, seed: int = 0) -> float:
    """Mean seconds of one whole-model HVP whose probe is supported on a single layer."""
    from mpsearch.layers import discover

    work = copy.deepcopy(model).eval()
    layers, _ = discover(work)
    params = trainable_weights(work, layers)
    hvp = HessianVectorProduct(work, batches, resolve_objective(loss, None), params)
    gen = torch.Generator().manual_seed(seed)
    step = max(1, len(params) // n_layers)
    for idx in range(0, len(params), step)[:n_layers]:
        for _ in range(n_probes):
            v = [torch.zeros_like(p) for p in params]
            v[idx] = rademacher([params[idx].shape], gen)[0]
            hv = hvp(v)
            _ = float((v[idx] * hv[idx]).sum())
    return hvp.seconds / hvp.count


def run_model(name: str, args) -> list[dict]:
    zoo = load(name, n_calib=CALIB[name] if not args.quick else min(CALIB[name], 8))
    batches, loss = zoo.calibration, zoo.loss
    start = time.perf_counter()
    measured = Measured(progress=False).estimate(zoo.model, batches, OPTIONS, loss, cache=False)
    measured_s = time.perf_counter() - start
    truth = {o: per_layer(measured, o) for o in OPTIONS}
    out = []
    for est_name in args.estimators:
        est = REGISTRY[est_name](progress=False)
        if args.quick and isinstance(est, HessianTrace):
            est.max_probes = 8
        start = time.perf_counter()
        table = measured if est_name == "measured" else est.estimate(zoo.model, batches, OPTIONS, loss, cache=False)
        wall = time.perf_counter() - start
        row = {
            "model": name,
            "estimator": est_name,
            "n_calib": sum(len(b) if not isinstance(b, dict) else len(b["input_ids"]) for b in batches),
        }
        for option, key in (("int4", "spearman_vs_measured"), ("int3", "spearman_3bit")):
            pred = per_layer(table, option).reindex(truth[option].index)
            row[key] = float(spearmanr(pred, truth[option]).statistic)
        row["wall_s"] = measured_s if est_name == "measured" else wall
        if isinstance(est, HessianTrace):
            bare = loop_hvp_seconds(zoo.model, batches, loss, args.loop_layers, args.loop_probes)
            n_layers = len(table.layers)
            stats = est.stats_
            row.update(
                {
                    "hvps": stats["hvps"],
                    "hvp_s": stats["hvp_s"],
                    "trace_s": stats["trace_s"],
                    "bare_hvp_s": bare,
                    "overhead_vs_bare_hvps": stats["trace_s"] / (stats["hvps"] * bare),
                    "per_layer_loop_ratio": n_layers * stats["hvps"] * bare / stats["trace_s"],
                    "loop_extrapolated_from": f"{args.loop_layers} layers x {args.loop_probes} probes",
                }
            )
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CALIB))
    p.add_argument("--estimators", nargs="+", default=list(REGISTRY))
    p.add_argument("--loop-layers", type=int, default=3)
    p.add_argument("--loop-probes", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="8 calibration samples, 8 Hessian probes")
    args = p.parse_args(argv)
    for name in args.models:
        run_model(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
