"""llama.cpp's legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and F16) as torch, all blocks of a tensor at once.

Ported from ggml/src/ggml-quants.c: ``quantize_row_q*_ref`` (what ``llama-quantize`` runs without an
importance matrix; the ``gguf`` package's numpy quantizers are the same reference, used by the tests as an
independent oracle) and ``quantize_row_q*_impl`` (the ``quant_weights`` path of ``--imatrix``; Q8_0 has
none), by the rules of :mod:`mpsearch.quant.ggml_math`. Same signature as :mod:`mpsearch.quant.kquants`:
float32 rows ``(n, k * 32)``, the columns' importance ``qw`` or None -> ``(packed, values)``.
"""

from __future__ import annotations

import torch

from mpsearch.quant.ggml_math import (
    F32,
    div,
    div0,
    f16,
    fp16_bytes,
    make_qkx_quants,
    make_qx_quants,
    seq_sum,
    signed_absmax,
    sqrt,
)

QK = 32
U8 = torch.uint8


def _nibbles(lv: torch.Tensor) -> torch.Tensor:
    """levels (..., 32) -> qs (..., 16): byte j holds levels j (low nibble) and j + 16 (high)."""
    return (lv[..., :16] & 0xF) | ((lv[..., 16:] & 0xF) << 4)


def _high_bits(lv: torch.Tensor) -> torch.Tensor:
    """bit 4 of each of 32 levels -> qh (..., 4): the uint32 whose bit k is level k's, little-endian."""
    bits = ((lv >> 4) & 1).reshape(*lv.shape[:-1], 4, 8)
    return (bits << torch.arange(8, device=lv.device, dtype=U8)).sum(-1).to(U8)


def row_sigma2(rows: torch.Tensor) -> torch.Tensor:
    """sum(x^2) / n_per_row of each whole row (the impl paths' weight scale; ``quantize_rows`` computes it
    once when it cuts a tensor's rows into chunks)."""
    return div(seq_sum(rows * rows), rows.shape[1])


def _weights(rows: torch.Tensor, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor | None) -> torch.Tensor:
    """The impl paths' weights qw * sqrt(sigma2 + x^2)."""
    sigma2 = (row_sigma2(rows) if sigma2 is None else sigma2)[:, None, None]
    return qw.reshape(1, -1, QK).to(x.device, F32) * sqrt(sigma2 + x * x)


def _trunc_u8(v: torch.Tensor, top: int | None) -> torch.Tensor:
    """(uint8_t) MIN(top, (int8_t) v) for non-negative v."""
    v = torch.trunc(v)
    return (v if top is None else torch.clamp(v, max=top)).to(U8)


def _absmax_scaled(x, levels):
    """Q4_0/Q5_0 reference: d = max / -levels (signed), id = 1/d or 0."""
    _, vmax = signed_absmax(x)
    d = div(vmax, -levels)
    return d, div0(torch.ones_like(d), d)


def _min_max_scaled(x, top):
    """Q4_1/Q5_1 reference: d = (max - min) / top, id = 1/d or 0, and the min."""
    lo, hi = x.amin(-1), x.amax(-1)
    d = div(hi - lo, top)
    return d, div0(torch.ones_like(d), d), lo


def _symmetric(rows, qw, sigma2, half: int):
    """Q4_0/Q5_0 (``half`` 8 or 16): (fp16 d, levels in [0, 2 half)); values are (levels - half) * d."""
    x = rows.reshape(rows.shape[0], -1, QK)
    if qw is None:
        d, inv = _absmax_scaled(x, half)
        lv = _trunc_u8(x * inv[..., None] + (half + 0.5), 2 * half - 1)
    else:
        d, lv = make_qx_quants(x, half, _weights(rows, x, qw, sigma2))
    d = f16(d)
    return d, lv, ((lv.to(F32) - half) * d[..., None]).reshape(rows.shape)


def q4_0(rows, qw=None, sigma2=None):
    d, lv, values = _symmetric(rows, qw, sigma2, 8)
    return torch.cat([fp16_bytes(d), _nibbles(lv)], -1).reshape(rows.shape[0], -1), values


def q5_0(rows, qw=None, sigma2=None):
    d, lv, values = _symmetric(rows, qw, sigma2, 16)
    return torch.cat([fp16_bytes(d), _high_bits(lv), _nibbles(lv)], -1).reshape(rows.shape[0], -1), values


def _with_min(rows, qw, nmax, sigma2):
    """Q4_1/Q5_1: (fp16 d, fp16 m, levels); values are levels * d + m."""
    x = rows.reshape(rows.shape[0], -1, QK)
    if qw is None:
        d, inv, lo = _min_max_scaled(x, nmax)
        lv = _trunc_u8((x - lo[..., None]) * inv[..., None] + 0.5, 15 if nmax == 15 else None)
        return x, f16(d), f16(lo), lv
    d, the_min, lv = make_qkx_quants(x, _weights(rows, x, qw, sigma2), nmax, -0.9, 0.05, 36)
    return x, f16(d), f16(-the_min), lv


def q4_1(rows, qw=None, sigma2=None):
    x, d, m, lv = _with_min(rows, qw, 15, sigma2)
    values = lv.to(F32) * d[..., None] + m[..., None]
    return torch.cat([fp16_bytes(d), fp16_bytes(m), _nibbles(lv)], -1).reshape(rows.shape[0], -1), values.reshape(
        rows.shape
    )


def q5_1(rows, qw=None, sigma2=None):
    x, d, m, lv = _with_min(rows, qw, 31, sigma2)
    values = lv.to(F32) * d[..., None] + m[..., None]
    packed = torch.cat([fp16_bytes(d), fp16_bytes(m), _high_bits(lv), _nibbles(lv)], -1)
    return packed.reshape(rows.shape[0], -1), values.reshape(rows.shape)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    t = torch.trunc(v)
    return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), 0.0)


def q8_0(rows, qw=None, sigma2=None):
    """Q8_0 has no importance path: llama-quantize ignores the imatrix for it."""
    n = rows.shape[0]
    x = rows.reshape(n, -1, QK)
    d = div(x.abs().amax(-1), 127)
    q = _roundf(x * div0(torch.ones_like(d), d)[..., None]).to(torch.int8)
    d = f16(d)
    values = q.to(F32) * d[..., None]
    return torch.cat([fp16_bytes(d), q.view(U8)], -1).reshape(n, -1), values.reshape(rows.shape)


def float16(rows, qw=None, sigma2=None):
    """F16: each weight rounded to fp16, half to even (``ggml_fp32_to_fp16_row``); no importance path."""
    h = rows.to(torch.float16)
    return h.contiguous().view(U8).reshape(rows.shape[0], -1), h.to(F32)


QUANTIZERS = {"q4_0": q4_0, "q4_1": q4_1, "q5_0": q5_0, "q5_1": q5_1, "q8_0": q8_0, "f16": float16}
