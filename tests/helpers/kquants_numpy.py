"""A test oracle: the first, numpy port of llama.cpp's reference k-quant quantizers (Q2_K ... Q6_K), checked
byte for byte against llama-quantize on SmolLM2 (272 of 272 tensors). mpsearch now runs the torch port
(mpsearch/quant/kquants.py); tests/test_ggml_quants.py checks that the two agree byte for byte.

Ported from ``quantize_row_q{2..6}_K_ref`` in ggml/src/ggml-quants.c (what ``llama-quantize`` runs without an
importance matrix), because the ``gguf`` package has dequantizers for the k-quants but no quantizers. Every
function takes float32 super-blocks ``(n, 256)`` and returns ``(packed, values)``: the blocks' bytes in the
GGUF layout (``(n, type_size)`` uint8) and the dequantized float32 values computed with the C dequantizer's
arithmetic. Tests check ``values`` bit for bit against ``gguf.quants.dequantize(packed)``.

Faithfulness: every sum is accumulated in float32 in the C loop's order, rounding is ``nearest_int``
(round half to even, as np.rint), fp16 conversion rounds to nearest even. A llama.cpp build that contracts
multiply-adds into FMA instructions can round a few intermediate sums differently, so on rare blocks its
choice of levels may differ from this port (the bytes here always decode to ``values`` exactly).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
F32 = np.float32


def _f16(x) -> np.ndarray:
    """Round to fp16 and back (GGML_FP32_TO_FP16 then GGML_FP16_TO_FP32)."""
    return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis in float32, left to right (the C loop's order), vectorized over the rest."""
    acc = np.zeros(terms.shape[:-1], dtype=F32)
    for i in range(terms.shape[-1]):
        acc += terms[..., i]
    return acc


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the x value where it is reached first), per row."""
    idx = np.abs(x).argmax(-1)[..., None]
    value = np.take_along_axis(x, idx, -1)[..., 0]
    return np.abs(value), value


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b in float32, 0 where b == 0 (those results are never used)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, F32(1)), F32(0)).astype(F32)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL): (scale, L in [0, 2 nmax)) per row."""
    amax, vmax = _signed_absmax(x)
    zero = amax < F32(1e-15)
    vmax = np.where(zero, F32(1), vmax)
    w = x * x

    def levels(iscale):
        return np.clip(np.rint(iscale[..., None] * x), -nmax, nmax - 1).astype(F32)

    def sums(lv):
        return _seq_sum(w * x * lv), _seq_sum(w * lv * lv)

    lv = levels(F32(-nmax) / vmax)
    sumlx, suml2 = sums(lv)
    scale = _div(sumlx, suml2)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand = levels(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
        slx, sl2 = sums(cand)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        lv = np.where(better[..., None], cand, lv)
        scale = np.where(better, _div(slx, sl2), scale)
        best = np.where(better, scale * slx, best)
    lv = np.where(zero[..., None], F32(-nmax), lv)
    return np.where(zero, F32(0), scale), (lv + nmax).astype(np.int8)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale, L in [0, 2 nmax)) per row."""
    amax, vmax = _signed_absmax(x)
    zero = amax < F32(1e-15)
    vmax = np.where(zero, F32(1), vmax)
    lv = np.clip(np.rint((F32(-nmax) / vmax)[..., None] * x), -nmax, nmax - 1).astype(F32)
    w = x * x
    sumlx, suml2 = _seq_sum(w * x * lv), _seq_sum(w * lv * lv)
    for _ in range(5):  # a pass that changes nothing leaves the state as it is: no early exit needed
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], lv[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = np.clip(np.rint(_div(xi * sl2, slx)), -nmax, nmax - 1).astype(F32)
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[..., i] = np.where(take, new, li)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    scale = np.where(zero | (suml2 <= 0), F32(0), _div(sumlx, suml2))
    lv = np.where(zero[..., None], F32(-nmax), lv)
    return scale, (lv + nmax).astype(np.int8)


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants: (scale, the_min >= 0, L in [0, nmax]) per row; x ~ scale * L - the_min."""
    lo = np.minimum(x.min(-1), F32(0))
    hi = x.max(-1)
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo)
    sum_w = _seq_sum(weights)
    sum_x = _seq_sum(weights * x)

    def levels(iscale, low):
        return np.clip(np.rint(iscale[..., None] * (x - low[..., None])), 0, nmax).astype(F32)

    def error(scale, low, lv):
        diff = scale[..., None] * lv + low[..., None] - x
        return _seq_sum(weights * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / span
    scale = F32(1) / iscale
    lv = levels(iscale, lo)
    best = error(scale, lo, lv)
    low = lo
    for step in range(nstep + 1):
        # as in C, both the step and the offset use the best min found so far
        width = np.where(flat, F32(1), hi - low)
        aux = levels((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / width, low)
        sum_l, sum_l2, sum_xl = _seq_sum(weights * aux), _seq_sum(weights * aux * aux), _seq_sum(weights * aux * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = this_min > 0
        this_scale = np.where(positive, _div(sum_xl, sum_l2), this_scale)
        this_min = np.where(positive, F32(0), this_min)
        better = ok & (error(this_scale, this_min, aux) < best)
        best = np.where(better, error(this_scale, this_min, aux), best)
        lv = np.where(better[..., None], aux, lv)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    scale = np.where(flat, F32(0), scale)
    lv = np.where(flat[..., None], F32(0), lv)
    return scale, -np.where(flat, lo, low), lv.astype(np.uint8)


def _pack2(lv: np.ndarray) -> np.ndarray:
    """2-bit levels (n, 256) -> qs (n, 64): byte j/4 + l of each 128-half holds levels l, l+32, l+64, l+96."""
    halves = lv.reshape(-1, 2, 4, 32).astype(np.uint8)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12-byte Q4_K/Q5_K scales field."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _q45_k(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, 32)
    av_x = np.sqrt(_seq_sum(x * x) / F32(32))
    scales, mins, lv = make_qkx2_quants(x, av_x[..., None] + np.abs(x), nmax, rmin, 0.1, nstep, False)
    max_scale = np.maximum(scales.max(-1), F32(0))
    max_min = np.maximum(mins.max(-1), F32(0))
    inv_scale = np.where(max_scale > 0, _div(np.full_like(max_scale, 63), max_scale), F32(0))
    inv_min = np.where(max_min > 0, _div(np.full_like(max_min, 63), max_min), F32(0))
    ls = np.minimum(np.rint(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins), 63).astype(np.uint8)
    d, dmin = _f16(max_scale / F32(63)), _f16(max_min / F32(63))
    dl = d[:, None] * ls.astype(F32)
    ml = dmin[:, None] * lm.astype(F32)
    requant = np.clip(np.rint(_div(x + ml[..., None], np.broadcast_to(dl[..., None], x.shape))), 0, nmax)
    lv = np.where(dl[..., None] != 0, requant, lv).astype(np.uint8)
    values = (dl[..., None] * lv.astype(F32) - ml[..., None]).reshape(n, QK_K)
    head = np.concatenate(
        [d.astype(np.float16).view(np.uint8).reshape(n, 2), dmin.astype(np.float16).view(np.uint8).reshape(n, 2)], 1
    )
    return head, _k4_scales(ls, lm), lv.reshape(n, QK_K), values


def q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    head, scales, lv, values = _q45_k(blocks, 15, -1.0, 20)
    quads = lv.reshape(-1, 4, 2, 32)
    qs = (quads[:, :, 0] | (quads[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, scales, qs], 1), values


def q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    head, scales, lv, values = _q45_k(blocks, 31, -0.5, 15)
    quads = lv.reshape(-1, 4, 2, 32)  # 64-element chunks k: levels j and j + 32
    low = quads & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (quads >> 4) & 1  # bit 2k of qh[j] for level j, bit 2k + 1 for level j + 32
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = ((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1))).sum(1, dtype=np.uint8)
    return np.concatenate([head, scales, qh, qs], 1), values


def q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    scales, lv = make_qx_quants(x, 32)
    abs_scale, max_scale = _signed_absmax(scales)
    empty = abs_scale < F32(1e-15)
    iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d = np.where(empty, F32(0), _f16(F32(1) / iscale))
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    sc = np.where(empty[:, None], np.int8(0), sc)
    dl = d[:, None] * sc.astype(F32)
    requant = np.clip(np.rint(_div(x, np.broadcast_to(dl[..., None], x.shape))), -32, 31) + 32
    lv = np.where(dl[..., None] != 0, requant, lv.astype(F32)).astype(np.uint8)
    lv = np.where(empty[:, None, None], np.uint8(0), lv)
    values = np.where(empty[:, None], F32(0), (dl[..., None] * (lv.astype(F32) - 32)).reshape(n, QK_K))
    halves = lv.reshape(n, 2, 4, 32)  # per 128-half: levels l, l+32, l+64, l+96
    low, high = halves & 0xF, halves >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(n, 2)], 1), values


def q3_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    scales, lv = make_q3_quants(x, 4)
    _, max_scale = _signed_absmax(scales)
    has = max_scale != 0
    iscale = F32(-32) / np.where(has, max_scale, F32(1))
    ls = (np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)
    ls = np.where(has[:, None], ls, np.uint8(0))  # C leaves the scale field zeroed: decoded scale -32, d = 0
    d = np.where(has, _f16(F32(1) / iscale), F32(0))
    packed_scales = np.zeros((n, 12), dtype=np.uint8)
    packed_scales[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    hi = ls >> 4
    packed_scales[:, 8:12] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    dl = d[:, None] * (ls.astype(F32) - 32)
    requant = np.clip(np.rint(_div(x, np.broadcast_to(dl[..., None], x.shape))), -4, 3) + 4
    lv = np.where(dl[..., None] != 0, requant, lv.astype(F32)).astype(np.uint8).reshape(n, QK_K)
    values = (dl[..., None] * (lv.reshape(n, 16, 16).astype(F32) - 4)).reshape(n, QK_K)
    top = (lv > 3).astype(np.uint8).reshape(n, 8, 32)  # element j's high bit: bit j // 32 of hmask[j % 32]
    hmask = (top << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    qs = _pack2(np.where(lv > 3, lv - 4, lv))
    return np.concatenate([hmask, qs, packed_scales, d.astype(np.float16).view(np.uint8).reshape(n, 2)], 1), values


def q2_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    scales, mins, lv = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
    max_scale = np.maximum(scales.max(-1), F32(0))
    max_min = np.maximum(mins.max(-1), F32(0))
    ls = np.where(max_scale[:, None] > 0, np.rint(_div(np.full_like(max_scale, 15), max_scale)[:, None] * scales), 0)
    lm = np.where(max_min[:, None] > 0, np.rint(_div(np.full_like(max_min, 15), max_min)[:, None] * mins), 0)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    d = np.where(max_scale > 0, _f16(max_scale / F32(15)), F32(0))
    dmin = np.where(max_min > 0, _f16(max_min / F32(15)), F32(0))
    dl = d[:, None] * ls.astype(F32)
    ml = dmin[:, None] * lm.astype(F32)
    requant = np.clip(np.rint(_div(x + ml[..., None], np.broadcast_to(dl[..., None], x.shape))), 0, 3)
    lv = np.where(dl[..., None] != 0, requant, lv).astype(np.uint8)
    values = (dl[..., None] * lv.astype(F32) - ml[..., None]).reshape(n, QK_K)
    head = np.concatenate(
        [d.astype(np.float16).view(np.uint8).reshape(n, 2), dmin.astype(np.float16).view(np.uint8).reshape(n, 2)], 1
    )
    return np.concatenate([ls | (lm << 4), _pack2(lv.reshape(n, QK_K)), head], 1), values


QUANTIZERS = {"q2_k": q2_k, "q3_k": q3_k, "q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k}
