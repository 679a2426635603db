"""The inputs llama.cpp's CPU backend multiplies a quantized weight with: before each quantized matmul it rounds
the input to 8 bits in the weight type's ``vec_dot_type`` (ggml-cpu's type traits), so llama-perplexity measures
that rounding beside the weights' own. ``mpsearch.runtimes.inputs.rounded_inputs`` puts it on a model
(``evaluate(..., runtime_inputs=True)``, ``PlanFitness``, ``Measured``).

- Q8_0 for Q4_0, Q5_0, Q8_0, IQ4_NL and Q8_1 for Q4_1, Q5_1: blocks of 32, fp16 d = max|x| / 127, the levels
  round(x * 127 / max|x|) (the AVX2 path, round half to even). Q8_1 also keeps the block's sum d * sum(q) in
  fp16 for the weight's min; here it is the sum of the decoded values (the two differ by fp16 rounding, ~2^-11).
- Q8_K for the k-quants and the other i-quants: blocks of 256, scale -127 / x_max from the signed extreme,
  levels min(127, round(x * scale)), d = 1 / scale in float32 (``quantize_row_q8_K_ref``).
- F16 for F16 weights: each input rounded to fp16 (``ggml_cpu_fp32_to_fp16``, round half to even).

Estimators that model this rounding in the cost table (``Fisher``, ``Measured``) read it through
``Runtime.input_rounding``: a layer's damage in a type is then its weight error's and its input rounding's.

Ported from ggml/src/ggml-cpu (``quantize_row_q8_0``/``_q8_1`` AVX2 and ``quantize_row_q8_K_ref``): no
library rounds activations as ggml does. llama.cpp's CUDA backend rounds differently (Q8_1 for every
quantized type); this is the CPU backend's, the one the project's llama-perplexity checks run.
"""

from __future__ import annotations

import torch

from mpsearch.core import MpsearchError
from mpsearch.quant.ggml_math import div, div0, f16
from mpsearch.runtimes.llama_cpp import GGUF_TYPES

# GGUF type -> the CPU backend's vec_dot type (ggml-cpu's type_traits_cpu), i.e. how its inputs are rounded
VEC_DOT_TYPE = {name: "q8_k" if block == 256 else "q8_0" for name, (_, block, _) in GGUF_TYPES.items()}
VEC_DOT_TYPE.update(q4_1="q8_1", q5_1="q8_1", f16="f16")
VEC_DOT_BLOCK = {"q8_0": 32, "q8_1": 32, "q8_k": 256, "f16": 1}  # inputs rounded together


def round_input(x: torch.Tensor, vec_dot: str) -> torch.Tensor:
    """x rounded as llama.cpp's CPU backend rounds a matmul input to ``vec_dot`` (``VEC_DOT_TYPE`` of the
    weight's type: "q8_0"/"q8_1", blocks of 32; "q8_k", blocks of 256; "f16") over the last axis, decoded back
    to x's dtype."""
    if vec_dot == "f16":
        return x.half().to(x.dtype)
    block = VEC_DOT_BLOCK[vec_dot]
    if x.shape[-1] % block:
        raise MpsearchError(
            f"a matmul input of width {x.shape[-1]} is not whole blocks of {block}, which llama.cpp's vec_dot "
            "type needs",
            "plan a type whose block divides the layer's input width (llama-quantize refuses the others)",
        )
    b = x.float().reshape(-1, block)
    if block == 32:
        amax = b.abs().amax(-1, keepdim=True)
        q = torch.round(b * div0(torch.full_like(amax, 127.0), amax))
        return (q * f16(div(amax, 127))).reshape(x.shape).to(x.dtype)
    vmax = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # the first signed extreme
    scale = div0(torch.full_like(vmax, -127.0), vmax)
    q = torch.clamp(torch.round(scale * b), max=127)
    return (q * div0(torch.ones_like(scale), scale)).reshape(x.shape).to(x.dtype)
