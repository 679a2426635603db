"""The prepared device check (issue 26): every estimator and the GPTQ quantizer at scale, then whole searches
on a large model, in one command with a time budget. One JSON object per line, also appended to ``--out``
(default ``$OUT/gpu_check.jsonl`` when ``$OUT`` is set, as on the device machine).

  phase=speed     (GPU only) experiments/bench_llamacpp.py's speed row: seconds per llama.cpp type for one
                  4096 x 14336 tensor on the CPU and on the GPU, with and without an importance matrix
  kind=estimator  experiments/bench_scale.py's row for one (estimator or "gptq", size, dtype): peak over the
                  weights (``torch.cuda.max_memory_allocated``, reset once the model is loaded), wall time
  kind=search     one whole ``mpsearch.search`` (default estimator, ``core``, the measured check on) on a
                  random-init model made on the device in its dtype (no CPU copy), ``--target`` (the GPTQ
                  search: ``--gptq-target``, GPTQ having no grid for GGUF types), avg 4.5 bits,
                  then ``mpsearch.evaluate`` of the plan on a held-out batch: seconds of each stage
                  (model, quantizer, estimate, solve, check, evaluate), peak bytes over the loaded model
  kind=skipped    a stage not started because the time left (``--budget-s``) was under ``--min-stage-s``
  kind=timeout    a stage stopped at the time left
  kind=error      a stage that failed: its one-line message (an out-of-memory is one of these rows, never a
                  crash of the script)
  kind=summary    rows of each kind, wall time of the whole check

Sizes are parameters (``bench_scale.CONFIGS``), so the same command runs on the CPU with tiny ones
(tests/test_gpu_check.py does, in CI):

    python experiments/gpu_check.py                              # GPU: 1.1B (bf16, fp32) + 8B searches, 8 min
    python experiments/gpu_check.py --device cpu --scale-sizes tiny --dtypes float32 --search-size tiny \\
        --estimators sqnr --budget-s 300
    bash experiments/gpu_check.sh                                # the device machine: wheels, then this
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_scale import ESTIMATORS, EXTRA  # noqa: E402  (experiments/bench_scale.py)

STAGE_CAP_S = 300  # no one stage may take more than this of the budget


def run_stage(cmd: list[str], timeout: float, label: dict) -> dict:
    """One stage in its own process (its own peak memory): its last JSON row, or a timeout / error row."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    began = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**label, "kind": "timeout", "after_s": round(time.perf_counter() - began, 1)}
    rows = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        return {**label, "kind": "error", "returncode": done.returncode, "message": tail[0][-500:]}
    return json.loads(rows[-1])


def search_child(args) -> int:
    """One whole search and the plan's evaluation; prints its row (an out-of-memory is an error row)."""
    import torch
    from bench_scale import build
    from memory import PeakMemory

    import mpsearch

    label = {"kind": "search", "config": args.size, "dtype": args.dtype, "quantizer": args.quantizer}
    label.update(device=args.device, target=args.target)
    memory = PeakMemory(args.device)
    memory.reset()
    began = time.perf_counter()
    try:
        model, batches = build(args.size, args.device, args.dtype, n_batches=5)
        calibration, held_out = batches[:4], batches[4:]
        stages = {"model": round(time.perf_counter() - began, 3)}
        loaded = memory.now()
        memory.reset()
        result = mpsearch.search(
            model, calibration, mpsearch.Budget(avg_bits=4.5), target=args.target, quantizer=args.quantizer
        )
        stages.update(result.extra["stages_s"])
        clock = time.perf_counter()
        q = result.extra["quantizer"]  # the searched GPTQ itself: an 8B one is too large to cache on disk
        measured = mpsearch.evaluate(model, result.plan, held_out, quantizer=q, progress=False, uniform=False)
        stages["evaluate"] = round(time.perf_counter() - clock, 3)
    except (torch.OutOfMemoryError, mpsearch.MpsearchError, RuntimeError) as err:
        kind = "out of memory" if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err) else ""
        print(json.dumps({**label, "kind": "error", "message": f"{kind}: {err}".strip(": ")[:500]}), flush=True)
        return 0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = memory.peak()
    row = {
        **label,
        "model_params": sum(p.numel() for p in model.parameters()),
        "stages_s": stages,
        "search_s": round(sum(v for k, v in stages.items() if k not in ("model", "evaluate")), 3),
        "avg_bits": measured["avg_bits"],
        "perplexity": measured.get("perplexity"),
        "perplexity_fp": measured.get("perplexity_fp"),
        "loaded_bytes": loaded,
        "peak_bytes": peak,
        "weight_bytes": weight_bytes,
        "peak_over_weights": round(max(peak - loaded, 0) / weight_bytes, 3),
        "safety": result.extra.get("safety", {}).get("chosen"),
    }
    print(json.dumps(row), flush=True)
    return 0


def plan(args) -> list[tuple[list[str], dict]]:
    """(command, label) of every stage, in order: on a GPU llama.cpp's quantizers on an 8B-sized tensor
    (bench_llamacpp.py's speed phase: every legacy/k-quant type plus IQ4_XS, with and without an imatrix; the
    target is under 2 s per pass), then estimators at scale, then the searches."""
    stages = []
    if args.device.startswith("cuda"):
        out = os.path.join(os.environ.get("OUT", "/tmp"), "llamacpp-speed")
        cmd = [sys.executable, str(HERE / "bench_llamacpp.py"), "--phases", "speed", "--out", out]
        stages.append((cmd, {"stage": "ggml speed"}))
    for dtype in args.dtypes:
        for size in args.scale_sizes:
            for name in args.estimators:
                cmd = [sys.executable, str(HERE / "bench_scale.py"), "--child", name, "--size", size]
                label = {"stage": "estimator", "estimator": name, "config": size, "dtype": dtype}
                stages.append((cmd + ["--device", args.device, "--dtype", dtype], label))
    for quantizer in args.quantizers if args.search_size else ():
        cmd = [sys.executable, __file__, "--search-child", "--size", args.search_size, "--device", args.device]
        target = args.target if quantizer == "rtn" else args.gptq_target  # GPTQ has no grid for GGUF types
        cmd += ["--dtype", args.search_dtype, "--quantizer", quantizer, "--target", target]
        stages.append((cmd, {"stage": "search", "config": args.search_size, "quantizer": quantizer}))
    return stages


def emit(row: dict, out: Path | None) -> None:
    print(json.dumps(row), flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale-sizes", nargs="*", default=["1.1B"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--estimators", nargs="*", default=[*ESTIMATORS, *EXTRA], choices=[*ESTIMATORS, *EXTRA])
    p.add_argument("--search-size", default="8B", help="'' for no searches")
    p.add_argument("--search-dtype", default="bfloat16")
    p.add_argument("--quantizers", nargs="*", default=["rtn", "gptq"])
    p.add_argument("--target", default="llama.cpp")
    p.add_argument("--gptq-target", default="mpsearch", help="the target of the GPTQ search (no GGUF grid)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall time of the whole check")
    p.add_argument("--min-stage-s", type=float, default=20.0, help="a stage starts only with this much time left")
    p.add_argument("--out", default=None, help="JSONL file (default: $OUT/gpu_check.jsonl when $OUT is set)")
    p.add_argument("--search-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--quantizer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.search_child:
        return search_child(args)
    from bench_scale import CONFIGS

    unknown = [s for s in [*args.scale_sizes, *([args.search_size] if args.search_size else [])] if s not in CONFIGS]
    if unknown:
        p.error(f"unknown sizes {unknown}: use {', '.join(CONFIGS)}")
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.jsonl" if "OUT" in os.environ else None)
    began = time.perf_counter()
    counts: dict[str, int] = {}
    for cmd, label in plan(args):
        left = args.budget_s - (time.perf_counter() - began)
        if left < args.min_stage_s:
            row = {**label, "kind": "skipped", "reason": f"{left:.0f} s of the {args.budget_s:.0f} s budget left"}
        else:
            row = run_stage(cmd, min(left, STAGE_CAP_S), label)
            row.setdefault("stage", label["stage"])
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
        emit(row, out)
    emit({"kind": "summary", "rows": counts, "wall_s": round(time.perf_counter() - began, 1)}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
