"""The inputs llama.cpp's CPU backend multiplies a quantized weight with: before each quantized matmul it rounds
the input to 8 bits in the weight type's ``vec_dot_type`` (ggml-cpu's type traits), so llama-perplexity measures
that rounding beside the weights' own. ``evaluate(..., runtime_inputs=True)`` measures it too.

- Q8_0 for Q4_0, Q5_0, Q8_0, IQ4_NL and Q8_1 for Q4_1, Q5_1: blocks of 32, fp16 d = max|x| / 127, the levels
  round(x * 127 / max|x|) (the AVX2 path, round half to even). Q8_1 also keeps the block's sum d * sum(q) in
  fp16 for the weight's min; here it is the sum of the decoded values (the two differ by fp16 rounding, ~2^-11).
- Q8_K for the k-quants and the other i-quants: blocks of 256, scale -127 / x_max from the signed extreme,
  levels min(127, round(x * scale)), d = 1 / scale in float32 (``quantize_row_q8_K_ref``).

Ported from ggml/src/ggml-cpu (``quantize_row_q8_0``/``_q8_1`` AVX2 and ``quantize_row_q8_K_ref``): no
library rounds activations as ggml does. llama.cpp's CUDA backend rounds differently (Q8_1 for every
quantized type); this is the CPU backend's, the one the project's llama-perplexity checks run.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from mpsearch.core import MpsearchError
from mpsearch.quant.ggml_math import div, div0, f16
from mpsearch.runtimes.llama_cpp import GGUF_TYPES

VEC_DOT_BLOCK = {name: 32 if block == 32 else 256 for name, (_, block, _) in GGUF_TYPES.items()}


def round_input(x: torch.Tensor, block: int) -> torch.Tensor:
    """x rounded as llama.cpp's CPU backend rounds a matmul input for a weight whose vec_dot type has blocks of
    ``block`` (32: Q8_0/Q8_1, 256: Q8_K) over the last axis, decoded back to x's dtype."""
    if x.shape[-1] % block:
        raise MpsearchError(
            f"a matmul input of width {x.shape[-1]} is not whole blocks of {block}, which llama.cpp's vec_dot "
            "type needs",
            "plan a type whose block divides the layer's input width (llama-quantize refuses the others)",
        )
    b = x.float().reshape(-1, block)
    vmax = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # the first signed extreme
    if block == 32:
        amax = vmax.abs()
        q = torch.round(b * div0(torch.full_like(amax, 127.0), amax))
        return (q * f16(div(amax, 127))).reshape(x.shape).to(x.dtype)
    scale = div0(torch.full_like(vmax, -127.0), vmax)
    q = torch.clamp(torch.round(scale * b), max=127)
    return (q * div0(torch.ones_like(scale), scale)).reshape(x.shape).to(x.dtype)


@contextmanager
def rounded_inputs(model: torch.nn.Module, plan):
    """Forward pre-hooks on ``model`` that round each planned layer's input as llama.cpp's CPU backend does (a
    tied head, e.g. ``lm_head`` sharing the embedding, multiplies with the embedding's type: the model's own
    ties, whatever the plan records); all removed on exit. A plan option that is not a GGUF type is refused:
    only llama.cpp plans have this rounding."""
    from mpsearch.layers import unit_map
    from mpsearch.outputs import hooked

    other = sorted({o for o in plan.assignments.values() if o not in VEC_DOT_BLOCK})
    if other:
        raise MpsearchError(
            f"runtime input rounding models llama.cpp's CPU backend, and this plan holds {', '.join(other)}, "
            "which are not GGUF types",
            "use it for plans searched with --target llama.cpp only",
        )
    units = unit_map(model)

    def hook(block):
        return lambda module, args: (round_input(args[0], block), *args[1:])

    def registrations():
        for layer, option in plan.assignments.items():
            for name in units[layer].names:  # the unit and the modules tied to it
                module = model.get_submodule(name)
                if not isinstance(module, torch.nn.Embedding):  # a lookup: no matmul, nothing rounded
                    yield module.register_forward_pre_hook(hook(VEC_DOT_BLOCK[option]))

    with hooked(registrations()):
        yield
