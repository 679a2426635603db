"""Headline benchmark: mixed precision vs uniform quantization on held-out data, at matched sizes.

For each model: uniform baselines (int8, int6, int4, int3 per-channel; int4_g128; fp8_e4m3) and searched
plans (every estimator x DP, plus Evolutionary) at budgets of 0.875x and 1.0x uniform int4's size (DP also at
uniform int3's and int6's sizes), measured on the model's held-out evaluation data. Prints one JSON
object per (model, method, budget): model, method, budget, avg_bits, size_bytes, metric_name, metric, loss
(KL or cosine distance to full precision; lower is better); then one "targets" object per model. Writes
<out>/quality_<model>.png.

    python experiments/bench_quality.py                 # all zoo models, every estimator (~20 min)
    python experiments/bench_quality.py --quick         # fewer estimators and trials (CI)
    python experiments/bench_quality.py --model my_pkg.my_module:build   # a user model (see --help)
    python experiments/bench_quality.py --fair          # issue 13: default search (safe) vs fair uniforms,
                                                        # RTN and GPTQ, budgets 3.0/3.5/4.0 bits, 0.875x int4
    python experiments/bench_quality.py --fair --models minilm-l6 --n-calib 128   # more calibration samples
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import solvers.ilp  # noqa: F401  (OR-Tools first)
from mpsearch import Budget, estimate, evaluate, solve, uniform_plan
from mpsearch.data import n_samples
from mpsearch.fitness import PlanFitness
from mpsearch.models import ZOO, ZooModel, load
from solvers import Evolutionary, Problem

UNIFORM = ["int8", "int6", "int4", "int3", "int4_g128", "fp8_e4m3"]
SEARCH_OPTIONS = ["int3", "int4", "int5", "int6", "int8", "int3_g128", "int4_g128"]
ESTIMATORS = ["sqnr", "hessian", "fisher", "entropy", "relevance"]


def load_model(spec: str, n_calib: int | None = None) -> ZooModel:
    """A zoo name (with ``n_calib`` calibration samples, default the zoo's), or ``module:function`` returning a
    ZooModel (model, calibration, evaluation, loss)."""
    if spec in ZOO:
        return load(spec, n_calib=n_calib)
    if n_calib is not None:
        raise SystemExit(f"--n-calib is for zoo models; {spec} builds its own calibration data")
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)()


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def run(zoo: ZooModel, estimators: list[str], trials: int, out: Path) -> list[dict]:
    rows = []
    name = zoo.name
    for option in UNIFORM:
        m = evaluate(zoo.model, uniform_plan(zoo.model, option), zoo.evaluation, zoo.loss)
        rows.append(emit({"model": name, "method": f"uniform-{option}", "budget": None, **_keep(m)}))
    size = {r["method"][8:]: r["size_bytes"] for r in rows}
    budgets = {
        "0.875x int4": 0.875 * size["int4"],
        "1.0x int4": size["int4"],
        "int3": size["int3"],
        "int6": size["int6"],
    }
    tables = {}
    for est in estimators:
        tables[est] = estimate(
            zoo.model, zoo.calibration, est, SEARCH_OPTIONS, zoo.loss, estimator_params={"progress": False}
        )
        for label, limit in budgets.items():
            result = solve(tables[est], Budget(size_bytes=limit), "dp")
            m = evaluate(zoo.model, result.plan, zoo.evaluation, zoo.loss, uniform=False)
            rows.append(emit({"model": name, "method": f"{est}+dp", "budget": label, **_keep(m)}))
    if trials:
        fitness = PlanFitness(zoo.model, zoo.calibration, zoo.loss)
        for label in ("0.875x int4", "1.0x int4"):
            best_est = max(tables, key=lambda e: _metric_at(rows, f"{e}+dp", label))
            problem = Problem(tables[best_est], Budget(size_bytes=budgets[label]))
            with tempfile.TemporaryDirectory() as run_dir:
                result = Evolutionary(fitness, n_trials=trials, run_dir=run_dir).solve(problem)
            m = evaluate(zoo.model, result.plan, zoo.evaluation, zoo.loss, uniform=False)
            rows.append(emit({"model": name, "method": f"{best_est}+evolutionary", "budget": label, **_keep(m)}))
    rows.append(emit(targets(name, rows)))
    plot(name, rows, out / f"quality_{name}.png")
    return rows


def _keep(m: dict) -> dict:
    return {k: m[k] for k in ("avg_bits", "size_bytes", "metric_name", "metric", "loss")}


def _metric_at(rows, method, budget) -> float:
    return next(r["metric"] for r in rows if r.get("method") == method and r.get("budget") == budget)


def targets(name: str, rows: list[dict]) -> dict:
    """The two headline checks, over every searched plan by its real size (not by the budget it was run at)."""
    int4 = next(r for r in rows if r.get("method") == "uniform-int4")
    searched = [r for r in rows if r.get("budget")]
    small = [r for r in searched if r["size_bytes"] <= 0.875 * int4["size_bytes"]]
    same = [r for r in searched if r["size_bytes"] <= int4["size_bytes"]]
    best_small = max(small, key=lambda r: r["metric"])
    best_same = max(same, key=lambda r: r["metric"])
    return {
        "model": name,
        "method": "targets",
        "int4_size_bytes": int4["size_bytes"],
        "int4_loss": int4["loss"],
        "best_at_0875": best_small["method"],
        "best_at_0875_size_ratio": best_small["size_bytes"] / int4["size_bytes"],
        "best_at_0875_loss": best_small["loss"],
        "smaller_at_equal_quality": best_small["metric"] >= int4["metric"],
        "best_at_int4": best_same["method"],
        "best_at_int4_loss": best_same["loss"],
        "loss_reduction_at_int4_size": 1 - best_same["loss"] / int4["loss"],
    }


def plot(name: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    uni = [r for r in rows if r.get("method", "").startswith("uniform-")]
    ax.scatter([r["size_bytes"] for r in uni], [r["loss"] for r in uni], marker="x", color="black", label="uniform")
    for r in uni:
        ax.annotate(
            r["method"][8:], (r["size_bytes"], r["loss"]), textcoords="offset points", xytext=(3, 3), fontsize=8
        )
    methods = sorted({r["method"] for r in rows if r.get("budget")})
    for method in methods:
        pts = sorted((r["size_bytes"], r["loss"]) for r in rows if r.get("method") == method)
        ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "*", label=method, markersize=5 if len(pts) > 1 else 12)
    ax.set_xlabel("weight bytes (scales included)")
    ax.set_ylabel(f"{'KL' if rows[0]['metric_name'] == 'neg_kl' else 'cosine distance'} to full precision (held-out)")
    ax.set_yscale("log")
    ax.set_title(f"{name}: quality vs size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FAIR_BUDGETS = {"3.0 bits": ("avg_bits", 3.0), "3.5 bits": ("avg_bits", 3.5), "4.0 bits": ("avg_bits", 4.0)}


def fair(zoo: ZooModel, quantizers: list[str], estimator: str | None) -> list[dict]:
    """The default search (held-out check and refinement on) against fair baselines, per quantizer and budget:
    uniform int4 (per channel) and the best uniform option of the model's own option set that fits the
    budget, all measured on the held-out evaluation data. One row per (quantizer, budget), then a summary."""
    from mpsearch import search
    from mpsearch.api import DEFAULT_ESTIMATOR, plan_size
    from mpsearch.quant.quantizer import make_quantizer

    name, estimator = zoo.name, estimator or DEFAULT_ESTIMATOR
    int4_size = plan_size(zoo.model, uniform_plan(zoo.model, "int4"))["size_bytes"]
    budgets = {**FAIR_BUDGETS, "0.875x int4": ("size_bytes", 0.875 * int4_size)}
    rows = []
    for quantizer in quantizers:
        q = make_quantizer(quantizer, zoo.model, zoo.calibration)
        measure = functools.partial(_measure, zoo, q)
        options = list(zoo.options)
        uniform = {o: measure(uniform_plan(zoo.model, o)) for o in [*options, "int4"]}
        for label, (axis, limit) in budgets.items():
            start = time.perf_counter()
            result = search(
                zoo.model,
                zoo.calibration,
                Budget(**{axis: limit}),
                estimator,
                options=options,
                loss_fn=zoo.loss,
                quantizer=quantizer,
            )
            wall = time.perf_counter() - start
            fits = {o: m for o, m in uniform.items() if o in options and m[axis] <= limit * (1 + 1e-9)}
            best_uniform = min(fits, key=lambda o: fits[o]["loss"]) if fits else None
            # the plans with the very quantizer they were searched with (GPTQ on the fit split, from its spec)
            searched = functools.partial(
                evaluate, zoo.model, data=zoo.evaluation, loss=zoo.loss, calibration=zoo.calibration
            )
            plan_m, searched_m = searched(plan=result.plan), searched(plan=result.extra["searched_plan"])
            rows.append(
                emit(
                    {
                        "model": name,
                        "method": "fair",
                        "quantizer": quantizer,
                        "estimator": estimator,
                        "budget": label,
                        "n_calib": n_samples_of(zoo.calibration),
                        "avg_bits": plan_m["avg_bits"],
                        "size_bytes": plan_m["size_bytes"],
                        "loss": plan_m["loss"],
                        "metric_name": plan_m["metric_name"],
                        "metric": plan_m["metric"],
                        "searched_loss": searched_m["loss"],
                        "chosen": result.extra["safety"]["chosen"],
                        "int4_loss": uniform["int4"]["loss"],
                        "int4_size_bytes": uniform["int4"]["size_bytes"],
                        "best_uniform": best_uniform,
                        "best_uniform_loss": fits[best_uniform]["loss"] if fits else None,
                        "search_s": round(wall, 2),
                        "safety_s": round(result.extra["safety"]["wall_s"], 2),
                        "estimate_s": result.extra["table"].meta.get("estimate_s"),  # when it was computed
                        "refine_moves": result.extra["safety"]["refine_moves"],
                        "refine_evals": result.extra["safety"]["refine_evals"],
                        "searched_check_loss": result.extra["safety"]["searched_loss"],
                        "refined_check_loss": result.extra["safety"]["refined_loss"],
                    }
                )
            )
    rows.append(emit(fair_targets(name, rows)))
    return rows


def n_samples_of(batches: list) -> int:
    return sum(n_samples(b) for b in batches)


def _measure(zoo: ZooModel, quantizer, plan) -> dict:
    return evaluate(zoo.model, plan, zoo.evaluation, zoo.loss, quantizer=quantizer, uniform=False)


def fair_targets(name: str, rows: list[dict]) -> dict:
    """Issue 13's targets on this model's rows."""
    wins = [r for r in rows if r["best_uniform_loss"] is not None]
    small = [r for r in rows if r["budget"] == "0.875x int4"]
    reductions = [1 - r["loss"] / r["best_uniform_loss"] for r in wins if r["best_uniform_loss"] > 0]
    return {
        "model": name,
        "method": "fair_targets",
        "n_calib": rows[0].get("n_calib") if rows else None,
        "at_0875_beats_int4": all(r["loss"] <= r["int4_loss"] for r in small),
        "never_worse_than_best_uniform": all(r["loss"] <= r["best_uniform_loss"] * (1 + 1e-9) for r in wins),
        "mean_loss_reduction_vs_best_uniform": float(np.mean(reductions)) if reductions else None,
        "refinement_changed_plan": sum(r["chosen"] == "refined" for r in rows),
        "uniform_returned": sum(r["chosen"].startswith("uniform") for r in rows),
        "cells": len(rows),
        "safety_share_of_search_time": float(
            sum(r["safety_s"] for r in rows) / max(sum(r["search_s"] for r in rows), 1e-9)
        ),
    }


def fair_table(rows: list[dict]) -> str:
    """The README's markdown table of ``--fair`` rows (and one line per model with its targets)."""
    lines = [
        "| model (calibration samples) | quantizer | budget | plan: bits, loss | returned (moves kept/measured) "
        "| uniform int4 loss "
        "| best uniform within budget (loss) | vs best uniform | estimate s | search s (check s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["method"] != "fair":
            continue
        mark = (" ✓" if r["loss"] <= r["int4_loss"] else " ✗") if r["budget"] == "0.875x int4" else ""
        change = r["loss"] / r["best_uniform_loss"] - 1
        worse = " ✗" if change > 1e-9 else ""
        lines.append(
            f"| {r['model']} ({r.get('n_calib', 'zoo default')}) | {r['quantizer']} | {r['budget']} "
            f"| {r['avg_bits']:.2f}, {r['loss']:.4g}{mark} "
            f"| {r['chosen']} ({r['refine_moves']}/{r['refine_evals']}) | {r['int4_loss']:.4g} "
            f"| {r['best_uniform']} ({r['best_uniform_loss']:.4g}) | {change:+.0%} loss{worse} "
            f"| {r['estimate_s']:.1f} | {r['search_s']:.1f} ({r['safety_s']:.1f}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        default=[m for m in ZOO if m != "smollm2-135m"],  # the LLM has its own benchmark: bench_llm.py
        help="zoo names or module:function",
    )
    p.add_argument("--estimators", nargs="+", default=None)
    p.add_argument("--trials", type=int, default=None, help="Evolutionary trials (0: skip)")
    p.add_argument("--quick", action="store_true", help="fisher only, 8 evolutionary trials")
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--fair", action="store_true", help="the default search vs fair uniform baselines (issue 13)")
    p.add_argument("--quantizers", nargs="+", default=["rtn", "gptq"], help="with --fair")
    p.add_argument("--fair-table", metavar="JSONL", help="print the README table of --fair results and exit")
    p.add_argument("--n-calib", type=int, default=None, help="with --fair: calibration samples of zoo models")
    args = p.parse_args(argv)
    if args.fair_table:
        print(fair_table([json.loads(line) for line in Path(args.fair_table).read_text().splitlines() if line]))
        return 0
    if args.fair:
        models = args.models if "--models" in (argv or sys.argv) else list(ZOO)
        for spec in models:
            fair(load_model(spec, args.n_calib), args.quantizers, args.estimators[0] if args.estimators else None)
        return 0
    estimators = args.estimators or (["fisher"] if args.quick else ESTIMATORS)
    trials = args.trials if args.trials is not None else (8 if args.quick else 100)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.models:
        run(load_model(spec), estimators, trials, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
