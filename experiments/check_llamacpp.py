"""The GGUF ``mpsearch quantize`` writes, checked against the real llama.cpp (CI job ``llama.cpp``).

For a plan that gives the model's tensors every llama.cpp type their rows allow (legacy, k-quants, i-quants;
IQ3_XXS, IQ2_S and IQ2_XS only with an importance matrix, as llama-quantize makes them), written three ways:
without an importance matrix, with the imatrix mpsearch collects from the calibration text, and with the one
``llama-imatrix`` computes from the same text (read back by mpsearch); and a fourth, with GPTQ on llama.cpp's
blocks (``mpsearch.quant.gptq_gguf``, the types it has a grid for), checked by 1. and 3. only (its levels are
GPTQ's, not llama-quantize's round to nearest):
1. the written GGUF holds each planned tensor in its planned type, in ggml's row size, and every other
   tensor as the source held it;
2. ``llama-quantize --tensor-type-file`` (the file written beside it; ``--imatrix`` the imatrix file written
   beside it, or llama-imatrix's) from the same source makes the very same bytes, tensor for tensor;
3. ``llama-perplexity`` of the GGUF, as a ratio to the f32 model's, is within 0.5% of mpsearch's own ratio
   (the same quantized values, scored on llama-perplexity's own chunks of the same text, each quantized
   layer's input rounded to 8 bits as llama.cpp's CPU backend rounds it: ``evaluate``'s ``runtime_inputs``,
   ``mpsearch.runtimes.llama_cpp_inputs``;
   the ratio without that rounding is reported beside it).
Also: mpsearch's imatrix against llama-imatrix's on the same tokens. One JSON object per line; exit 1 on any
mismatch.

    python experiments/check_llamacpp.py --bin "$(experiments/build_llamacpp.sh)"
The default model is the zoo's SmolLM2-135M GGUF (stored Q4_1, token_embd Q8_0: requantizing to those types
is nearly lossless, which is why the plan here cycles through all of them, not only the cheap ones).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_tools import (  # noqa: E402
    emit,
    f32_copy,
    imatrix,
    llama_chunks,
    perplexity,
    run,
    second_half_perplexity,
    tensors,
)

RATIO_TOLERANCE = 0.005  # llama-perplexity's ratio to f32 vs mpsearch's, relative


def check_file(out: Path, source: Path, plan, infos) -> int:
    """1.: planned tensors in their types and sizes, the rest as the source holds them; failures."""
    from mpsearch.runtimes.llama_cpp import tensor_bytes, tensors_of

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
    return failures


def same_bytes(mine_path: Path, theirs_path: Path) -> tuple[dict, dict]:
    """(tensors per type, tensors whose bytes differ per type)."""
    mine, theirs = tensors(mine_path), tensors(theirs_path)
    differ: dict[str, int] = {}
    per_type: dict[str, int] = {}
    for name, t in mine.items():
        o = theirs[name]
        per_type[t.tensor_type.name] = per_type.get(t.tensor_type.name, 0) + 1
        if t.tensor_type != o.tensor_type or not np.array_equal(np.asarray(t.data), np.asarray(o.data)):
            differ[t.tensor_type.name] = differ.get(t.tensor_type.name, 0) + 1
    return per_type, differ


def compare_imatrices(mine, theirs) -> dict:
    """How far mpsearch's imatrix entries are from llama-imatrix's (relative, over all columns)."""
    rel = []
    for name, s in mine.sums.items():
        if name in theirs.sums:
            a = s / mine.counts[name]
            b = theirs.sums[name] / theirs.counts[name]
            rel.append(((a - b).abs() / b.abs().clamp_min(1e-12)).flatten())
    rel = torch.cat(rel)
    return {
        "entries": len(mine.sums),
        "shared": sum(n in theirs.sums for n in mine.sums),
        "tokens": [max(mine.counts.values()), max(theirs.counts.values())],
        "median_rel_diff": float(rel.median()),
        "p99_rel_diff": float(rel.quantile(0.99)),
    }


def verdict(**row) -> int:
    """Print a check's line and count it as a failure exactly when its ``ok`` is false (the exit status then
    always agrees with what the log shows)."""
    emit(**row)
    return int(not row["ok"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True, help="folder of llama-quantize, llama-perplexity, llama-imatrix")
    parser.add_argument("--model", help="a GGUF (default: the zoo's SmolLM2-135M)")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=32, help="chunks of --ctx tokens, for the imatrix and the score")
    args = parser.parse_args()

    import mpsearch
    from mpsearch.core import BitPlan, parse_option
    from mpsearch.layers import find_units
    from mpsearch.models.local import load_local
    from mpsearch.models.smollm2 import gguf_path
    from mpsearch.models.sources import corpus_sentences
    from mpsearch.quant.apply import quantized_weights, swapped
    from mpsearch.quant.gptq import GPTQ
    from mpsearch.quant.imatrix import Imatrix
    from mpsearch.quant.quantizer import RTN
    from mpsearch.runtimes.inputs import rounded_inputs
    from mpsearch.runtimes.llama_cpp import GGUF_TYPES

    binary, source = Path(args.bin), Path(args.model or gguf_path())
    work = Path(tempfile.mkdtemp(prefix="check-llamacpp-"))
    sentences = corpus_sentences()
    calib_text, eval_text = work / "calib.txt", work / "eval.txt"
    calib_text.write_text("\n".join(sentences[:1500]))
    eval_text.write_text("\n".join(sentences[-1500:]))  # the corpus's tail: the zoo's held-out side
    zoo = load_local(str(source), None)
    model = zoo.model
    infos, _ = mpsearch.discover(model)
    units = {u.name: u for u in find_units(model)}

    def cycling_plan(quantizer) -> BitPlan:
        """Each tensor the next of the types it can take with this quantizer (rows of whole blocks; the
        imatrix-only types only with an importance matrix, as llama-quantize makes them), counted apart for each
        set of types: the tensors that take the 256-blocks (one in seven here) cycle through all of them."""
        seen: dict[tuple[str, ...], int] = {}
        plan = {}
        for info in infos:
            fit = tuple(t for t in GGUF_TYPES if quantizer.takes(units[info.name], parse_option(t)))
            seen[fit] = seen.get(fit, -1) + 1
            plan[info.name] = fit[seen[fit] % len(fit)]
        return BitPlan(
            plan,
            provenance={"runtime": "llama.cpp", "aliases": {i.name: list(i.aliases) for i in infos if i.aliases}},
        )

    f32 = f32_copy(binary, source, work / "f32.gguf")
    calib = llama_chunks(source, calib_text.read_text(), args.ctx, args.chunks)
    scored = llama_chunks(source, eval_text.read_text(), args.ctx, args.chunks)

    start = time.perf_counter()
    calib_batches = [{"input_ids": row[None]} for row in calib]
    mine_im = Imatrix(model, calib_batches)
    theirs_file = imatrix(binary, f32, calib_text, args.ctx, args.chunks, work / "llama-imatrix.gguf")
    theirs_im = Imatrix.from_gguf(theirs_file, model)
    emit(check="imatrix vs llama-imatrix", seconds=round(time.perf_counter() - start, 1),
         **compare_imatrices(mine_im, theirs_im))  # fmt: skip

    ppl_f32 = perplexity(binary, f32, eval_text, args.ctx, args.chunks)
    mine_f32 = second_half_perplexity(model, scored)
    emit(check="f32", llama_perplexity=ppl_f32, mpsearch_perplexity=mine_f32)
    failures = 0
    gptq = GPTQ(model, calib_batches)
    ways = (("reference", RTN()), ("imatrix", mine_im), ("llama-imatrix", theirs_im), ("gptq", gptq))
    for label, quantizer in ways:
        out = work / f"mixed-{label}.gguf"
        plan = cycling_plan(quantizer)
        start = time.perf_counter()
        info = mpsearch.quantize(model, plan, out, source=source, quantizer=quantizer)
        bad = check_file(out, source, plan, infos)
        seconds = round(time.perf_counter() - start, 1)
        types = sorted(set(plan.assignments.values()))
        failures += verdict(check="planned types and bytes", quantizer=label, seconds=seconds, types=types,
                            bits_per_weight=info["bits_per_weight"], ok=not bad)  # fmt: skip

        if label != "gptq":  # GPTQ's levels are not llama-quantize's round to nearest: checked by the score only
            theirs_path = work / f"llama-quantize-{label}.gguf"
            cmd = [str(binary / "llama-quantize"), "--allow-requantize", "--tensor-type-file", info["side_files"][0]]
            if label != "reference":
                cmd += ["--imatrix", info["side_files"][1] if label == "imatrix" else str(theirs_file)]
            run([*cmd, str(source), str(theirs_path), "q8_0", "2"])
            per_type, differ = same_bytes(out, theirs_path)
            failures += verdict(check="bytes equal llama-quantize's", quantizer=label, per_type=per_type,
                                differ=differ, ok=not differ)  # fmt: skip

        ppl = perplexity(binary, out, eval_text, args.ctx, args.chunks)
        with swapped(model, quantized_weights(model, plan, quantizer)):
            mine = second_half_perplexity(model, scored)
            with rounded_inputs(model, plan):
                rounded = second_half_perplexity(model, scored)
        theirs_ratio, mine_ratio, rounded_ratio = ppl / ppl_f32, mine / mine_f32, rounded / mine_f32
        off, off_rounded = abs(theirs_ratio / mine_ratio - 1), abs(theirs_ratio / rounded_ratio - 1)
        failures += verdict(check="llama-perplexity ratio vs mpsearch's", quantizer=label, llama_perplexity=ppl,
                            llama_ratio=theirs_ratio, mpsearch_perplexity=mine, mpsearch_ratio=mine_ratio,
                            relative_gap=off, mpsearch_ratio_rounded_inputs=rounded_ratio,
                            relative_gap_rounded_inputs=off_rounded, ok=off_rounded <= RATIO_TOLERANCE)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
