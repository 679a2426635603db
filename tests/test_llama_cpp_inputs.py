"""llama.cpp's CPU-backend input rounding (``mpsearch.runtimes.llama_cpp_inputs``): Q8_0/Q8_1 and Q8_K against
numpy oracles written from ggml's C, the hooks on a tied head and their removal, and ``evaluate``'s
``runtime_inputs`` (the full-precision side untouched, the quantized side rounded)."""

import numpy as np
import pytest
import torch
from helpers.tiny_llama import tiny_llama

import mpsearch
from mpsearch.core import BitPlan, MpsearchError
from mpsearch.runtimes.inputs import rounded_inputs
from mpsearch.runtimes.llama_cpp_inputs import VEC_DOT_TYPE, round_input


def _x(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.linspace(0.1, 3.0, cols)
    x[0, :32] = 0.0  # an all-zero block: d = 0, every level 0
    x[1, 3] = -40.0  # a negative extreme
    return x


def _q8_0_avx2(x: np.ndarray) -> np.ndarray:
    """ggml-cpu's quantize_row_q8_0 (AVX2): id = 127 / max|x|, levels rounded half to even, d stored fp16."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.round(b * inv)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (q * d).reshape(x.shape)


def _q8_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref: the first signed extreme, iscale = -127 / max, min(127, nearest_int), d = 1 / iscale."""
    out = np.empty_like(x, dtype=np.float32)
    for i, b in enumerate(x.reshape(-1, 256).astype(np.float32)):
        amax, vmax = np.float32(0), np.float32(0)
        for v in b:
            if abs(v) > amax:
                amax, vmax = abs(v), v
        if amax == 0:
            out.reshape(-1, 256)[i] = 0
            continue
        iscale = np.float32(-127) / vmax
        q = np.minimum(np.round(iscale * b), 127)
        out.reshape(-1, 256)[i] = q * (np.float32(1) / iscale)
    return out.reshape(x.shape)


def test_q8_0_and_q8_k_rounding_match_ggml():
    x = _x(4, 512)
    assert torch.equal(round_input(x, "q8_0"), torch.from_numpy(_q8_0_avx2(x.numpy())))
    assert torch.equal(round_input(x, "q8_1"), round_input(x, "q8_0"))  # Q8_1 adds a sum, not other levels
    assert torch.equal(round_input(x, "q8_k"), torch.from_numpy(_q8_k(x.numpy())))
    assert torch.equal(round_input(x, "q8_0")[0, :32], torch.zeros(32))
    assert torch.equal(round_input(x, "f16"), torch.from_numpy(x.numpy().astype(np.float16).astype(np.float32)))
    # 8 bits: each value within half a level of its block, plus the fp16 d's relative error (2^-11 of 127
    # levels); bf16 inputs come back as bf16
    err = (round_input(x, "q8_0") - x).abs().reshape(-1, 32).amax(1)
    assert bool((err <= x.abs().reshape(-1, 32).amax(1) * (1 / 254 + 2**-11)).all())
    assert round_input(x.bfloat16(), "q8_k").dtype == torch.bfloat16
    with pytest.raises(MpsearchError, match="not whole blocks of 256"):
        round_input(torch.ones(2, 576), "q8_k")


def test_every_gguf_type_has_ggml_cpus_vec_dot_type():
    from mpsearch.runtimes.llama_cpp import GGUF_TYPES

    assert set(VEC_DOT_TYPE) == set(GGUF_TYPES)
    assert {n for n, t in VEC_DOT_TYPE.items() if t == "q8_0"} == {"q4_0", "q5_0", "q8_0", "iq4_nl"}
    assert {n for n, t in VEC_DOT_TYPE.items() if t == "q8_1"} == {"q4_1", "q5_1"}
    assert VEC_DOT_TYPE["f16"] == "f16" and VEC_DOT_TYPE["q6_k"] == VEC_DOT_TYPE["iq4_xs"] == "q8_k"


def test_hooks_round_each_planned_input_with_its_types_block_a_tied_head_too_and_leave_no_trace():
    model = tiny_llama(tied=True)
    plan = BitPlan({"model.embed_tokens": "q8_0", "model.layers.0.mlp.down_proj": "q4_k"})
    names = ("lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj")
    seen, rounded = {}, {}
    # in one forward: each input before the rounding (a pre-hook registered first) and as the layer gets it
    taps = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.update({n: a[0].clone()}))
            for n in names]  # fmt: skip
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), rounded_inputs(model, plan):
        taps += [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: rounded.update({n: a[0].clone()}))
                 for n in names]  # fmt: skip
        model(ids)
    for t in taps:
        t.remove()
    assert torch.equal(rounded["lm_head"], round_input(seen["lm_head"], "q8_0"))  # the embedding's q8_0: Q8_0
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(rounded[down], round_input(seen[down], "q8_k"))
    assert not torch.equal(rounded["lm_head"], seen["lm_head"])
    assert torch.equal(rounded["model.layers.0.mlp.up_proj"], seen["model.layers.0.mlp.up_proj"])  # not planned
    assert not any(m._forward_pre_hooks for m in model.modules())
    with rounded_inputs(model, BitPlan({"model.layers.0.mlp.up_proj": "int4_g32"})):  # mpsearch's: none rounded
        assert not any(m._forward_pre_hooks for m in model.modules())


def test_evaluate_with_runtime_inputs_rounds_only_the_quantized_side():
    model = tiny_llama(tied=False)
    data = [{"input_ids": torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(s))} for s in (2, 3)]
    plan = BitPlan({"model.layers.0.mlp.down_proj": "q8_0", "lm_head": "q8_0"})
    plain = mpsearch.evaluate(model, plan, data, progress=False, uniform=False)
    rounded = mpsearch.evaluate(model, plan, data, progress=False, uniform=False, runtime_inputs=True)
    assert rounded["perplexity_fp"] == plain["perplexity_fp"]
    assert rounded["perplexity"] != plain["perplexity"] and rounded["avg_bits"] == plain["avg_bits"]
    assert not any(m._forward_pre_hooks for m in model.modules())
