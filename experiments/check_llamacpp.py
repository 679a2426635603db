"""The GGUF ``mpsearch quantize`` writes, checked against the real llama.cpp (CI job ``llama.cpp``).

For a plan that gives the model's tensors every llama.cpp type their rows allow (legacy and k-quants):
1. the written GGUF holds each planned tensor in its planned type, in ggml's row size, and every other
   tensor as the source held it;
2. ``llama-quantize --tensor-type-file`` (the file written beside it) from the same source makes the very
   same bytes, tensor for tensor;
3. ``llama-perplexity`` loads it; its perplexity and that of the f32 model are reported.
One JSON object per line; exit 1 on any mismatch.

    python experiments/check_llamacpp.py --bin "$(experiments/build_llamacpp.sh)"
The default model is the zoo's SmolLM2-135M GGUF (stored Q4_1, token_embd Q8_0: requantizing to those types
is nearly lossless, which is why the plan here cycles through all of them, not only the cheap ones).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"check_llamacpp: {' '.join(cmd[:2])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def perplexity(binary: Path, gguf: Path, text: Path, ctx: int, chunks: int) -> float:
    out = run([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx),
               "--chunks", str(chunks), "-t", "2"])  # fmt: skip
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="folder of llama-quantize and llama-perplexity")
    parser.add_argument("--model", help="a GGUF (default: the zoo's SmolLM2-135M)")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=16)
    args = parser.parse_args()

    import mpsearch
    from mpsearch.core import BitPlan
    from mpsearch.models.local import load_local
    from mpsearch.models.smollm2 import gguf_path
    from mpsearch.models.sources import corpus_sentences
    from mpsearch.runtimes.llama_cpp import GGUF_TYPES, tensor_bytes, tensors_of

    binary, source = Path(args.bin), Path(args.model or gguf_path())
    work = Path(tempfile.mkdtemp(prefix="check-llamacpp-"))
    text = work / "eval.txt"
    text.write_text("\n".join(corpus_sentences()[-1500:]))  # the corpus's tail: the zoo's held-out side
    zoo = load_local(str(source), None)
    infos, _ = mpsearch.discover(zoo.model)
    types = list(GGUF_TYPES)
    fits = [[t for t in types if info.shape[1] % GGUF_TYPES[t][1] == 0] for info in infos]
    plan = BitPlan(
        {info.name: fit[i % len(fit)] for i, (info, fit) in enumerate(zip(infos, fits))},
        provenance={"runtime": "llama.cpp", "aliases": {i.name: list(i.aliases) for i in infos if i.aliases}},
    )
    out = work / "mixed.gguf"
    start = time.perf_counter()
    info = mpsearch.quantize(zoo.model, plan, out, source=source)
    emit(check="quantize", seconds=round(time.perf_counter() - start, 1), **{k: info[k] for k in (
        "file_bytes", "tensor_bytes", "charged_bytes", "bits_per_weight")})  # fmt: skip
    failures = 0
    mine, src = tensors(out), tensors(source)
    planned = {tensor: (layer, plan[layer]) for layer, tensor in tensors_of(plan).items()}
    shapes = {i.name: i.shape for i in infos}
    for name, t in mine.items():
        if name in planned:
            layer, qtype = planned[name]
            ok = t.tensor_type.name.lower() == qtype and t.n_bytes == tensor_bytes(shapes[layer], qtype)
        else:
            ok = t.tensor_type == src[name].tensor_type and np.array_equal(np.asarray(t.data), src[name].data)
        failures += not ok
        if not ok:
            emit(check="planned type and bytes", tensor=name, ok=False)
    emit(
        check="planned types and bytes",
        tensors=len(mine),
        types=sorted(set(plan.assignments.values())),
        ok=not failures,
    )

    theirs_path = work / "llama-quantize.gguf"
    run([str(binary / "llama-quantize"), "--allow-requantize", "--tensor-type-file", info["side_files"][0],
         str(source), str(theirs_path), "q8_0", "2"])  # fmt: skip
    theirs = tensors(theirs_path)
    differ = {}
    for name, t in mine.items():
        o = theirs[name]
        if t.tensor_type != o.tensor_type or not np.array_equal(np.asarray(t.data), np.asarray(o.data)):
            differ[t.tensor_type.name] = differ.get(t.tensor_type.name, 0) + 1
    per_type: dict[str, int] = {}
    for t in mine.values():
        per_type[t.tensor_type.name] = per_type.get(t.tensor_type.name, 0) + 1
    emit(check="bytes equal llama-quantize's", tensors=len(mine), per_type=per_type, differ=differ, ok=not differ)
    failures += bool(differ)

    f32 = work / "f32.gguf"
    run([str(binary / "llama-quantize"), "--allow-requantize", str(source), str(f32), "f32", "2"])
    ppl_fp = perplexity(binary, f32, text, args.ctx, args.chunks)
    ppl = perplexity(binary, out, text, args.ctx, args.chunks)
    emit(check="llama-perplexity loads it", perplexity=ppl, perplexity_f32=ppl_fp, ratio=ppl / ppl_fp,
         ok=bool(np.isfinite(ppl)))  # fmt: skip
    failures += not np.isfinite(ppl)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
