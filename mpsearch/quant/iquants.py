"""llama.cpp's non-linear 4-bit i-quants (IQ4_NL: blocks of 32, 4.5 bpw; IQ4_XS: super-blocks of 256 with
6-bit block scales, 4.25 bpw) as torch, all blocks of a tensor at once.

Ported from ``quantize_row_iq4_nl_impl`` in ggml/src/ggml-quants.c, as ``quantize_iq4_nl`` /
``quantize_iq4_xs`` call it (what ``llama-quantize`` runs, with or without an importance matrix: ``ntry``
7), by the rules of :mod:`mpsearch.quant.ggml_math`. The 16 levels are ggml's ``kvalues_iq4nl``; each
weight takes the nearest level times its block scale, found for 15 trial scales at once. Same signature as
:mod:`mpsearch.quant.kquants`: float32 rows, the columns' importance ``qw`` or None -> ``(packed, values)``.
"""

from __future__ import annotations

import torch

from mpsearch.quant import ggml_numba, iquants_numba
from mpsearch.quant.ggml_math import (
    F32,
    best_index,
    div,
    div0,
    f16,
    fp16_bytes,
    nearest_level,
    seq_sum,
    seq_sum0,
    signed_absmax,
    sqrt,
)

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml-common.h
NTRY = 7
U8 = torch.uint8


def _block_scales(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each 32-block's scale: the best of the first guess -max/values[0] and 2 NTRY + 1 trial scales, by
    C's running comparison (``sumqx^2 > best * sumq2``); the levels are found again from the final scale. On
    a CPU with numba the same search runs compiled (:mod:`mpsearch.quant.iquants_numba`, same results)."""
    if x.device.type == "cpu" and ggml_numba.available():
        return iquants_numba.iq4_block_scales(x, weight, KVALUES, NTRY)
    return _block_scales_torch(x, weight)


def _block_scales_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``_block_scales`` as torch on any device, every candidate scale at once."""
    amax, vmax = signed_absmax(x)
    zero = amax < 1e-15
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    first = div(1, div(-vmax, float(KVALUES[0])))
    trials = torch.tensor([float(t + KVALUES[0]) for t in range(-NTRY, NTRY + 1)], dtype=F32, device=x.device)
    inv = torch.cat([first[None], div(trials.view(-1, *([1] * vmax.dim())), vmax)])  # (candidates, *blocks)
    xt, wt = x.movedim(-1, 0).contiguous()[:, None], weight.expand_as(x).movedim(-1, 0).contiguous()[:, None]
    q = nearest_level(KVALUES, inv * xt)  # element-major (32, candidates, *blocks)
    buf = torch.empty((q.shape[0], 2, *q.shape[1:]), dtype=F32, device=x.device)
    wq = wt * q
    torch.mul(wq, xt, out=buf[:, 0])
    torch.mul(wq, q, out=buf[:, 1])
    sumqx, sumq2 = seq_sum0(buf)
    d = div0(sumqx[0], sumq2[0])
    best = d * sumqx[0]
    for c in range(1, inv.shape[0]):
        better = (sumq2[c] > 0) & (sumqx[c] * sumqx[c] > best * sumq2[c])
        d = torch.where(better, div0(sumqx[c], sumq2[c]), d)
        best = torch.where(better, d * sumqx[c], best)
    return torch.where(zero, torch.zeros_like(d), d)


def _prepare(rows, qw, super_block):
    n = rows.shape[0]
    x = rows.reshape(n, -1, super_block // 32, 32)
    flat = x.reshape(n, -1, super_block)
    sigma2 = (seq_sum(flat * flat) * (2.0 / super_block))[..., None, None]
    if qw is None:
        weight = x * x
    else:
        weight = qw.reshape(1, -1, super_block // 32, 32).to(x.device, F32) * sqrt(sigma2 + x * x)
    values = torch.tensor(KVALUES, dtype=F32, device=x.device)
    return x, _block_scales(x, weight), values


def _pack(levels: torch.Tensor) -> torch.Tensor:
    """levels (..., 32) per block -> 16 bytes: byte j holds levels j (low nibble) and j + 16."""
    return levels[..., :16] | (levels[..., 16:] << 4)


def iq4_nl(rows, qw=None):
    x, scales, values = _prepare(rows, qw, 32)
    d = f16(scales[..., 0])
    levels = best_index(KVALUES, div0(torch.ones_like(scales), scales)[..., None] * x).to(U8)
    out = values[levels.long()] * d[..., None, None]
    packed = torch.cat([fp16_bytes(d), _pack(levels[..., 0, :])], -1)
    return packed.reshape(rows.shape[0], -1), out.reshape(rows.shape)


def iq4_xs(rows, qw=None):
    x, scales, values = _prepare(rows, qw, 256)
    _, max_scale = signed_absmax(scales)
    d = div(-max_scale, 32)
    ls = torch.clamp(torch.round(div0(torch.ones_like(d), d)[..., None] * scales), -32, 31)
    dl = d[..., None] * ls
    levels = best_index(KVALUES, div0(torch.ones_like(dl), dl)[..., None] * x).to(U8)
    ls = (ls + 32).to(U8)
    dh = f16(d)
    out = (dh[..., None] * (ls.to(F32) - 32))[..., None] * values[levels.long()]
    low = (ls[..., 0::2] & 0xF) | ((ls[..., 1::2] & 0xF) << 4)  # 4 bytes: blocks 2i (low nibble), 2i + 1 (high)
    high = ((ls >> 4).to(torch.int32) << (2 * torch.arange(8, device=x.device, dtype=torch.int32))).sum(-1)
    scales_h = torch.stack([high & 0xFF, high >> 8], -1).to(U8)
    packed = torch.cat([fp16_bytes(dh), scales_h, low, _pack(levels).flatten(-2)], -1)
    return packed.reshape(rows.shape[0], -1), out.reshape(rows.shape)


QUANTIZERS = {"iq4_nl": iq4_nl, "iq4_xs": iq4_xs}
