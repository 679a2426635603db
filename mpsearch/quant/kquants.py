"""llama.cpp's k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as torch, all super-blocks of a tensor at once.

Ported from ggml/src/ggml-quants.c: ``quantize_row_q*_K_ref`` (what ``llama-quantize`` runs without an
importance matrix) and ``quantize_row_q*_K_impl`` (its ``quant_weights`` path, with ``--imatrix``), by the
rules of :mod:`mpsearch.quant.ggml_math`. Every function takes float32 rows ``(n, k * 256)`` and the
importance of each column ``qw`` ``(k * 256,)`` or None, and returns ``(packed, values)``: the rows' bytes
in the GGUF layout (``(n, k * type_size)`` uint8) and the float32 values the C dequantizer decodes from them.
"""

from __future__ import annotations

import torch

from mpsearch.quant.ggml_math import (
    F32,
    div,
    div0,
    f16,
    fp16_bytes,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    seq_sum,
    signed_absmax,
    sqrt,
)

QK_K = 256
U8 = torch.uint8


def _split(rows: torch.Tensor, qw: torch.Tensor | None, sub: int):
    """rows (n, k*256) -> x (n, k, 256/sub, sub); qw alike (1, k, 256/sub, sub)."""
    n = rows.shape[0]
    x = rows.reshape(n, -1, QK_K // sub, sub)
    return x, None if qw is None else qw.reshape(1, -1, QK_K // sub, sub).to(rows.device, F32)


def _sigma2(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``factor * sum(x^2) / QK_K`` over each super-block (the impl paths' weight scale), broadcastable to x."""
    flat = x.reshape(*x.shape[:2], QK_K)
    return div(factor * seq_sum(flat * flat), QK_K)[..., None, None]


def _pack2(lv: torch.Tensor) -> torch.Tensor:
    """2-bit levels (..., 256) -> qs (..., 64): byte j/4 + l of each 128-half holds levels l, l+32, l+64, l+96."""
    h = lv.reshape(*lv.shape[:-1], 2, 4, 32)
    packed = h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)
    return packed.reshape(*lv.shape[:-1], 64)


def _requant(x, dl, ml, lo, hi, levels):
    """C's second pass: levels of ``(x + ml) / dl`` in [lo, hi] where dl != 0, else the first pass's."""
    q = torch.clamp(torch.round(div0(x + ml[..., None], dl[..., None].expand_as(x))), lo, hi) - lo
    return torch.where(dl[..., None] != 0, q.to(U8), levels)


def _finish_min(x, d, dmin, ls, lm, levels, nmax):
    """Types with a min (Q2_K, Q4_K, Q5_K): (levels, values) from fp16 d/dmin and integer scales/mins."""
    dl = d[..., None] * ls.to(F32)
    ml = dmin[..., None] * lm.to(F32)
    levels = _requant(x, dl, ml, 0, nmax, levels)
    values = dl[..., None] * levels.to(F32) - ml[..., None]
    return levels, values


def _max_scaled(scales, mins, top):
    """The reference's scale quantization: (d, dmin, ls, lm) with ls = round(top / max_scale * scale)."""
    max_scale, max_min = (torch.where(m > 0, m, 0.0) for m in (scales.amax(-1), mins.amax(-1)))  # C: from +0
    inv_scale = torch.where(max_scale > 0, div0(torch.full_like(max_scale, top), max_scale), 0.0)
    inv_min = torch.where(max_min > 0, div0(torch.full_like(max_min, top), max_min), 0.0)
    ls = torch.clamp(torch.round(inv_scale[..., None] * scales), max=top).to(U8)
    lm = torch.clamp(torch.round(inv_min[..., None] * mins), max=top).to(U8)
    return f16(div(max_scale, top)), f16(div(max_min, top)), ls, lm


def _imatrix_scales(x, qw, nmax):
    """Q4_K/Q5_K impl: sub-block (scale, min, levels) searched with weights qw * sqrt(sigma2 + x^2), then
    the 6-bit scales and mins by ``make_qp_quants`` weighted by each sub-block's weight sum."""
    weights = qw * sqrt(_sigma2(x, 2) + x * x)
    sw = seq_sum(weights)
    scales, mins, levels = make_qkx_quants(x, weights, nmax, -0.9, 0.05, 36)
    d, ls = make_qp_quants(scales, 63, sw)
    dmin, lm = make_qp_quants(mins, 63, sw)
    return f16(d), f16(dmin), torch.clamp(ls, max=63), torch.clamp(lm, max=63), levels


def _k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins per super-block -> the 12-byte Q4_K/Q5_K scales field."""
    return torch.cat(
        [ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6), lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6),
         (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)], -1)  # fmt: skip


def _q45_k(rows, qw, nmax, rmin, nstep):
    x, qw = _split(rows, qw, 32)
    if qw is None:
        av_x = sqrt(div(seq_sum(x * x), 32))
        scales, mins, levels = make_qkx_quants(x, av_x[..., None] + x.abs(), nmax, rmin, 0.1, nstep)
        d, dmin, ls, lm = _max_scaled(scales, mins, 63)
    else:
        d, dmin, ls, lm, levels = _imatrix_scales(x, qw, nmax)
    levels, values = _finish_min(x, d, dmin, ls, lm, levels, nmax)
    head = torch.cat([fp16_bytes(d), fp16_bytes(dmin), _k4_scales(ls, lm)], -1)
    return head, levels.reshape(*x.shape[:2], QK_K), values.reshape(rows.shape)


def q4_k(rows, qw=None):
    head, lv, values = _q45_k(rows, qw, 15, -1.0, 20)
    quads = lv.reshape(*lv.shape[:2], 4, 2, 32)
    qs = (quads[..., 0, :] | (quads[..., 1, :] << 4)).reshape(*lv.shape[:2], 128)
    return torch.cat([head, qs], -1).reshape(rows.shape[0], -1), values


def q5_k(rows, qw=None):
    head, lv, values = _q45_k(rows, qw, 31, -0.5, 15)
    quads = lv.reshape(*lv.shape[:2], 4, 2, 32)  # 64-element chunks c: levels j and j + 32
    low = quads & 0xF
    qs = (low[..., 0, :] | (low[..., 1, :] << 4)).reshape(*lv.shape[:2], 128)
    high = (quads >> 4) & 1  # bit 2c of qh[j] for level j, bit 2c + 1 for level j + 32
    shifts = (2 * torch.arange(4, device=rows.device, dtype=U8))[:, None]
    qh = ((high[..., 0, :] << shifts) | (high[..., 1, :] << (shifts + 1))).sum(-2).to(U8)
    return torch.cat([head, qh, qs], -1).reshape(rows.shape[0], -1), values


def q6_k(rows, qw=None):
    x, qw = _split(rows, qw, 16)
    scales, lv = make_qx_quants(x, 32, qw)
    abs_scale, max_scale = signed_absmax(scales)
    empty = abs_scale < 1e-15
    iscale = div(-128, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d = torch.where(empty, 0.0, f16(div(1, iscale)))
    sc = torch.clamp(torch.round(iscale[..., None] * scales), max=127)
    sc = torch.where(empty[..., None], 0.0, sc)
    dl = d[..., None] * sc
    lv = _requant(x, dl, torch.zeros_like(dl), -32, 31, lv)
    lv = torch.where(empty[..., None, None], 0, lv)
    values = torch.where(empty[..., None, None], 0.0, dl[..., None] * (lv.to(F32) - 32)).reshape(rows.shape)
    lv = lv.reshape(*x.shape[:2], 2, 4, 32)  # per 128-half: levels l, l+32, l+64, l+96
    low, high = lv & 0xF, lv >> 4
    ql = torch.cat([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], -1)
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    n, k = x.shape[:2]
    sc8 = sc.to(torch.int8).view(U8)
    packed = torch.cat([ql.reshape(n, k, 128), qh.reshape(n, k, 64), sc8, fp16_bytes(d)], -1)
    return packed.reshape(n, -1), values


def q3_k(rows, qw=None):
    x, qw = _split(rows, qw, 16)
    n, k = x.shape[:2]
    if qw is None:
        scales, lv = make_q3_quants(x, 4)
        _, max_scale = signed_absmax(scales)
        has = max_scale != 0
        iscale = div(-32, torch.where(has, max_scale, torch.ones_like(max_scale)))
        ls = torch.clamp(torch.round(iscale[..., None] * scales), -32, 31) + 32
        ls = torch.where(has[..., None], ls, 0.0).to(U8)  # C leaves the field zeroed: scale -32, d = 0
        d = torch.where(has, f16(div(1, iscale)), 0.0)
    else:
        weights = qw * sqrt(_sigma2(x, 2) + x * x)
        scales, lv = make_qx_quants(x, 4, weights)
        d, ls = make_qx_quants(scales, 32, seq_sum(weights))
        d = f16(d)
    packed_scales = torch.cat(
        [(ls[..., 0:8] & 0xF) | ((ls[..., 8:16] & 0xF) << 4),
         (ls[..., 0:4] >> 4) | ((ls[..., 4:8] >> 4) << 2) | ((ls[..., 8:12] >> 4) << 4) | ((ls[..., 12:16] >> 4) << 6)],
        -1)  # fmt: skip
    dl = d[..., None] * (ls.to(F32) - 32)
    lv = _requant(x, dl, torch.zeros_like(dl), -4, 3, lv).reshape(n, k, QK_K)
    values = (dl[..., None] * (lv.reshape(x.shape).to(F32) - 4)).reshape(rows.shape)
    top = (lv > 3).to(U8).reshape(n, k, 8, 32)  # element j's high bit: bit j // 32 of hmask[j % 32]
    hmask = (top << torch.arange(8, device=rows.device, dtype=U8)[:, None]).sum(-2).to(U8)
    qs = _pack2(torch.where(lv > 3, lv - 4, lv))
    return torch.cat([hmask, qs, packed_scales, fp16_bytes(d)], -1).reshape(n, -1), values


def q2_k(rows, qw=None):
    x, qw = _split(rows, qw, 16)
    n, k = x.shape[:2]
    if qw is None:
        scales, mins, lv = make_qkx_quants(x, x.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        d, dmin, ls, lm = _max_scaled(scales, mins, 15)
    else:
        weights = qw * sqrt(_sigma2(x, 1) + x * x)
        sw = seq_sum(weights)
        scales, mins, lv = make_qkx_quants(x, weights, 3, -0.9, 0.05, 36)
        d, ls = make_qp_quants(scales, 15, sw)
        dmin, lm = make_qp_quants(mins, 15, sw)
        d, dmin = f16(d), f16(dmin)
    lv, values = _finish_min(x, d, dmin, ls, lm, lv, 3)
    packed = torch.cat([ls | (lm << 4), _pack2(lv.reshape(n, k, QK_K)), fp16_bytes(d), fp16_bytes(dmin)], -1)
    return packed.reshape(n, -1), values.reshape(rows.shape)


QUANTIZERS = {"q2_k": q2_k, "q3_k": q3_k, "q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k}
