"""Estimators at scale: wall time and peak memory on random-init Llama models of ~25M, ~110M and ~350M
parameters (CPU), and ~1.1B (CUDA, when a GPU is there).

Workload (the same for every size): 4 calibration batches x 4 sequences x 128 random tokens (seeded), the
options below, each estimator in its own child process. Cheaper settings where an estimator's cost is
inherently larger, the same at every size: ``hessian`` 4 Hutchinson probes (one round) on the first batch
only; ``measured`` one option on one sequence of 128 tokens (a pass per layer: its time grows as layers x
parameters by definition); ``fisher`` 16 samples, 2 target draws each.

One JSON object per line (also appended to --out):

  kind=estimator  model_params, config, estimator, device, wall_s, peak_bytes, loaded_bytes, weight_bytes,
                  peak_over_weights = (peak during the estimate - loaded) / weight bytes, where "loaded" is
                  the peak of the model plus one no-grad forward of one batch (the model and one batch's
                  activations), and the target for that estimator
  kind=summary    per estimator: peak_over_weights at each size against its target, and time per parameter
                  at the largest size over that at the middle size (target <= 1.5)

Peak memory: VmHWM from the OS on CPU (reset through /proc/self/clear_refs after the warm-up forward),
``torch.cuda.max_memory_allocated`` on CUDA.

    python experiments/bench_scale.py                               # CPU: 25M, 110M, 350M (~30 min, 2 cores)
    python experiments/bench_scale.py --device cuda --sizes 1.1B    # one GPU
    python experiments/bench_scale.py --estimators gptq             # the GPTQ quantizer (not an estimator)
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

# name -> LlamaConfig fields (vocab 32000, untied lm_head as in Llama-2; embeddings are not quantized)
CONFIGS = {
    "25M": dict(hidden_size=288, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4),
    "110M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12),
    "350M": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8
    ),
    "1.1B": dict(  # TinyLlama-1.1B's shape
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "8B": dict(  # Llama-3-8B's shape
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # for tests of the scripts themselves (experiments/gpu_check.py on the CPU)
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),  # fmt: skip
}
ESTIMATORS = ("sqnr", "entropy", "relevance", "measured", "fisher", "hessian")
TARGETS = {"sqnr": 1.0, "entropy": 1.0, "relevance": 1.0, "measured": 1.0, "fisher": 2.0, "hessian": 4.0}
# not an estimator: the GPTQ quantizer (Hessians from the 4 calibration batches, then every linear layer
# GPTQ'd to int4_g128 one at a time, each result dropped); no issue target, so none here
EXTRA = {"gptq": None}
OPTIONS = ["int3_g64_asym", "int4_g64_asym", "int6_g64", "int8"]
PARAMS = {
    "hessian": {"min_probes": 4, "max_probes": 4, "round_size": 4},
    "fisher": {"max_samples": 16, "n_targets": 2},
}
N_BATCHES, BATCH, SEQ, VOCAB = 4, 4, 128, 32000


def build(size: str, device: str, dtype: str, n_batches: int = N_BATCHES):
    """(random-init LlamaForCausalLM made on ``device`` in ``dtype`` (no CPU copy, no float32 copy first),
    calibration batches on the CPU), both seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = {"vocab_size": VOCAB, **CONFIGS[size]}
    cfg = LlamaConfig(max_position_embeddings=SEQ, tie_word_embeddings=False, **fields)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device="cpu").manual_seed(1)
    vocab = fields["vocab_size"]
    batches = [
        {"input_ids": torch.randint(0, vocab, (BATCH, SEQ), generator=gen, device="cpu")} for _ in range(n_batches)
    ]
    return model, batches


def child(args) -> int:
    """Run one estimator on one size; print its row."""
    import torch

    import mpsearch
    from mpsearch.outputs import raw_call

    name = args.child
    model, batches = build(args.size, args.device, args.dtype)
    memory = PeakMemory(args.device)
    memory.reset()
    with torch.no_grad():  # the loaded model plus one batch's activations: the baseline
        raw_call(model, batches[0])
    loaded = memory.peak()
    memory.reset()
    options, data = OPTIONS, batches
    if name == "hessian":
        data = batches[:1]
    if name == "measured":
        options, data = ["int4_g64_asym"], [{"input_ids": batches[0]["input_ids"][:1]}]
    params = {"progress": False, **PARAMS.get(name, {})}
    start = time.perf_counter()
    if name == "gptq":
        layers, options, params = gptq_all(model, data), ["int4_g128"], {}
    else:
        layers = mpsearch.estimate(model, data, name, options, estimator_params=params, cache=False).layers
    wall = time.perf_counter() - start
    peak = memory.peak()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = {
        "kind": "estimator",
        "config": args.size,
        "model_params": n_params,
        "quantized_layers": len(layers),
        "estimator": name,
        "device": str(memory.device) if memory.cuda else "cpu",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "params": {k: v for k, v in params.items() if k != "progress"},
        "options": options,
        "calibration_tokens": sum(b["input_ids"].numel() for b in data),
        "wall_s": round(wall, 2),
        "peak_bytes": peak,
        "loaded_bytes": loaded,
        "weight_bytes": weight_bytes,
        "peak_over_weights": round(max(peak - loaded, 0) / weight_bytes, 3),
        "target": TARGETS.get(name),
    }
    print(json.dumps(row), flush=True)
    return 0


def gptq_all(model, batches) -> list[str]:
    """GPTQ every linear unit to int4_g128, one at a time (each result dropped): the quantizer's own cost."""
    import torch

    from mpsearch.layers import find_units
    from mpsearch.quant.gptq import GPTQ, covers

    quantizer = GPTQ(model, batches)
    done = []
    with torch.no_grad():
        for unit in find_units(model):
            if not covers(unit):  # embeddings, convolutions: not GPTQ's
                continue
            quantizer.quantize(unit, "int4_g128")
            done.append(unit.name)
    return done


def summary(rows: list[dict], sizes: list[str]) -> dict:
    out = {"kind": "summary", "sizes": sizes}
    for name in dict.fromkeys(r["estimator"] for r in rows):
        mine = {r["config"]: r for r in rows if r["estimator"] == name}
        entry = {
            "peak_over_weights": {s: mine[s]["peak_over_weights"] for s in sizes if s in mine},
            "target": TARGETS.get(name),
        }
        if name in TARGETS:
            entry["memory_ok"] = all(v <= TARGETS[name] for v in entry["peak_over_weights"].values())
        if len(sizes) >= 2 and sizes[-1] in mine and sizes[-2] in mine:
            per = {s: mine[s]["wall_s"] / mine[s]["model_params"] for s in sizes[-2:]}
            entry["time_per_param_ratio"] = round(per[sizes[-1]] / per[sizes[-2]], 3)
            entry["time_ok"] = entry["time_per_param_ratio"] <= 1.5
        out[name] = entry
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["25M", "110M", "350M"], choices=list(CONFIGS))
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=[*ESTIMATORS, *EXTRA])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="experiments/results_scale.jsonl")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    for size in args.sizes:
        for name in args.estimators:  # one process per run: its own peak memory
            cmd = [sys.executable, __file__, "--child", name, "--size", size, "--device", args.device]
            cmd += ["--dtype", args.dtype]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            emit(rows[-1], Path(args.out))
    emit(summary(rows, args.sizes), Path(args.out))
    return 0


def emit(row: dict, out: Path) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
