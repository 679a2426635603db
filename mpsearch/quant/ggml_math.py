"""ggml's scale searches (``make_qx_quants``, ``make_q3_quants``, ``make_qkx2/3_quants``, ``make_qp_quants``,
``best_index_int8``) as torch, vectorized over blocks, on whatever device the weights are on.

Ported from ggml/src/ggml-quants.c (llama.cpp) because no library ships ggml's quantizers for torch (the
``gguf`` package has numpy reference quantizers for Q4_0 ... Q8_0 only, without importance weights, and is
per row). Bit-exactness with llama-quantize rests on three rules followed everywhere here:

- every sum is accumulated in float32 in the C loop's order (``seq_sum``: one add per element, never
  ``torch.sum``, whose order differs), each product in the C expression's order (``w*x*l`` is ``(w*x)*l``);
- every operation is one torch op (no ``addcmul``, which may fuse a multiply-add): ggml's reference code
  is compiled without FMA contraction (ggml-base has no ``-march`` flags); divisions go through ``div``
  and roots through ``sqrt`` (torch's own shortcuts round differently);
- ``nearest_int`` is round half to even (``torch.round``), ``(int8_t)`` casts truncate, fp16 conversions
  round to nearest even (``torch.Tensor.half``, as F16C and ggml's software path do).

A scale search that tries candidates against a running best in C tries them here as one more tensor
dimension (all candidates at once) and then takes them in C's order on the per-block scalars, so ties and
rounding in the comparisons resolve exactly as in C. Searches whose later candidates depend on the running
state (``make_qkx*``: the offset moves with the best min) loop over candidates, vectorized over blocks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from mpsearch.quant import ggml_numba

F32 = torch.float32
GROUP_MAX_EPS = 1e-15


def f16(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back to float32."""
    return x.to(torch.float16).to(F32)


def fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 values (fp16-exact) -> their two little-endian fp16 bytes each, (..., 2) uint8."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(*d.shape, 2)


def seq_sum0(t: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over the first axis in float32 from 0, in order (the C loop's order; element-major tensors, whose
    terms are contiguous slices; or the terms themselves, e.g. a buffer's ``unbind`` made once for a loop)."""
    acc = torch.zeros_like(t[0])
    for row in t:
        acc += row
    return acc


def first_sum0(t: torch.Tensor) -> torch.Tensor:
    """Like ``seq_sum0`` but starting from the first term (C loops that start ``sum = x[0]``)."""
    acc = t[0].clone()
    for row in t[1:]:
        acc += row
    return acc


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """``seq_sum0`` over the last axis."""
    return seq_sum0(t.movedim(-1, 0).contiguous())


def signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the x where it is first reached) over the last axis (C's ``if (ax > amax)`` scan)."""
    idx = x.abs().argmax(-1, keepdim=True)
    value = x.gather(-1, idx).squeeze(-1)
    return value.abs(), value


def sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's vectorized float32 sqrt on the CPU is not (it differs in ~20% of
    cases); the float64 root rounded to float32 is (53 >= 2 * 24 + 2 bits)."""
    return torch.sqrt(x.double()).to(F32)


def div(a, b) -> torch.Tensor:
    """a / b in float32 as one IEEE division, for tensors or numbers (torch turns ``number / tensor`` into
    ``reciprocal(tensor) * number``, and CUDA ``tensor / number`` into a multiply: both round twice)."""
    like = a if isinstance(a, torch.Tensor) else b
    a, b = (t if isinstance(t, torch.Tensor) else torch.full((), t, dtype=F32, device=like.device) for t in (a, b))
    return torch.div(a, b)


def div0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b where b != 0, else 0 (C's ``b ? a/b : 0``; the other results are never used)."""
    ok = b != 0
    return torch.where(ok, div(a, torch.where(ok, b, torch.ones_like(b))), torch.zeros_like(a))


def qx_numerators(nmax: int) -> list[float]:
    """make_qx_quants' candidate scales times max, in C's order: -nmax, then -(nmax + 0.1f*is) for is = -9..9,
    is != 0 (float32 constants)."""
    f32 = np.float32
    return [float(-nmax)] + [-float(f32(nmax) + f32(0.1) * f32(s)) for s in range(-9, 10) if s]


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): (scale (...,), L (..., n) in [0, 2 nmax)) per block of
    the last axis; weights ``qw`` (broadcast to x) or x^2."""
    w = x * x if qw is None else qw.expand_as(x)
    numerators = qx_numerators(nmax)
    if x.device.type == "cpu" and ggml_numba.available():  # the same search compiled (same results)
        return ggml_numba.make_qx_quants(x, w, nmax, numerators)
    return make_qx_quants_torch(x, nmax, w, numerators)


def make_qx_quants_torch(x: torch.Tensor, nmax: int, w: torch.Tensor, numerators: list[float]):
    """``make_qx_quants`` as torch on any device, every candidate scale at once (``w``: the weights)."""
    amax, vmax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    steps = torch.tensor(numerators, dtype=F32, device=x.device)
    iscale = div(steps.view(-1, *([1] * vmax.dim())), vmax)  # (candidates, *blocks)
    xt, wt = x.movedim(-1, 0).contiguous(), w.movedim(-1, 0).contiguous()  # element-major (n, *blocks)
    lv = torch.mul(iscale, xt[:, None]).round_().clamp_(-nmax, nmax - 1)  # (n, candidates, *blocks)
    buf = torch.empty((lv.shape[0], 2, *lv.shape[1:]), dtype=F32, device=x.device)
    torch.mul((wt * xt)[:, None], lv, out=buf[:, 0])
    torch.mul(wt[:, None], lv, out=buf[:, 1]).mul_(lv)  # (w*l)*l, in place: no new pages to touch
    sumlx, suml2 = seq_sum0(buf)
    scale = div0(sumlx[0], suml2[0])
    best = scale * sumlx[0]
    choice = torch.zeros_like(zero, dtype=torch.long)
    for c in range(1, steps.shape[0]):
        slx, sl2 = sumlx[c], suml2[c]
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(better, div0(slx, sl2), scale)
        best = torch.where(better, scale * slx, best)
        choice = torch.where(better, c, choice)
    levels = lv.gather(1, choice.expand(lv.shape[0], 1, *choice.shape))[:, 0].movedim(0, -1) + nmax
    levels = torch.where(zero[..., None], torch.zeros_like(levels), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels.to(torch.uint8)


def _refine(x, w, lv, lo, hi, before: bool):
    """The coordinate descent of make_q3_quants / make_qp_quants: 5 passes over the elements, each moved to
    round(x * sl2 / slx) in [lo, hi] when that raises sumlx^2 / suml2; the sum of the other terms must be
    positive ``before`` the move (make_qp_quants) or after it (make_q3_quants). Returns (levels, sumlx,
    suml2). A pass that changes nothing leaves the state as it is, so C's early exit needs no counterpart."""
    wx = w * x
    sumlx, suml2 = seq_sum(wx * lv), seq_sum(w * lv * lv)
    # element-major copies: one contiguous (blocks,) slice per element of the C loop
    xs, ws, wxs, lvs = (t.movedim(-1, 0).contiguous() for t in (x, w, wx, lv))
    for _ in range(5):
        for i in range(xs.shape[0]):
            wi, xi, wxi, li = ws[i], xs[i], wxs[i], lvs[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new = torch.clamp(torch.round(div0(xi * sl2, slx)), lo, hi)
            slx2 = slx + wxi * new
            sl22 = sl2 + wi * new * new
            positive = sl2 > 0 if before else sl22 > 0
            take_it = (slx > 0) & positive & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lvs[i] = torch.where(take_it, new, li)
            sumlx = torch.where(take_it, slx2, sumlx)
            suml2 = torch.where(take_it, sl22, suml2)
    return lvs.movedim(0, -1), sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): (scale, L in [0, 2 nmax)) per block of the last axis."""
    amax, vmax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    lv = torch.clamp(torch.round(div(-nmax, vmax)[..., None] * x), -nmax, nmax - 1)
    w = x * x
    lv, sumlx, suml2 = _refine(x, w, lv, -nmax, nmax - 1, before=False)
    scale = torch.where(zero | (suml2 <= 0), torch.zeros_like(sumlx), div0(sumlx, suml2))
    levels = torch.where(zero[..., None], torch.zeros_like(lv), lv + nmax)
    return scale, levels.to(torch.uint8)


def make_qkx_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants (the same arithmetic given the weights; qkx3's NULL weights are
    x^2, passed here): (scale, the_min >= 0, L in [0, nmax]) per block; x ~ scale * L - the_min. On a CPU
    the compiled loop of :mod:`mpsearch.quant.ggml_numba` where numba is installed (same bytes), else torch."""
    if x.device.type == "cpu" and ggml_numba.available():
        return ggml_numba.make_qkx_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad)
    return make_qkx_quants_torch(x, weights, nmax, rmin, rdelta, nstep, use_mad)


def make_qkx_quants_torch(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx_quants`` as torch on any device, vectorized over blocks, one candidate at a time."""
    lo = torch.clamp(x.amin(-1), max=0.0)
    hi = x.amax(-1)
    flat = hi == lo
    # element-major (n, *blocks): per-block values broadcast from the right, each sum's terms are
    # contiguous slices, and the three sums of a step share one loop over a stacked buffer
    xt, wt = x.movedim(-1, 0).contiguous(), weights.expand_as(x).movedim(-1, 0).contiguous()
    sum_w, sum_x = first_sum0(torch.stack([wt, wt * xt], 1))
    one = torch.ones_like(hi)
    buf = torch.empty((xt.shape[0], 3, *xt.shape[1:]), dtype=F32, device=x.device)
    aux, diff = torch.empty_like(xt), torch.empty_like(xt)  # reused by every step (in place: no allocation)
    buf_rows, diff_rows = buf.unbind(0), diff.unbind(0)  # the sums' terms as views, made once

    def levels(iscale, low, out):
        torch.sub(xt, low, out=out)
        return out.mul_(iscale).round_().clamp_(0, nmax)

    def error(scale, low, lv):
        torch.mul(lv, scale, out=diff).add_(low).sub_(xt)  # (scale * L + min) - x
        diff.abs_() if use_mad else diff.mul_(diff)
        diff.mul_(wt)
        return seq_sum0(diff_rows)

    iscale = div(nmax, torch.where(flat, one, hi - lo))
    scale = div(1, iscale)
    best = error(scale, lo, levels(iscale, lo, aux))
    low = lo
    # the best levels are those of the (iscale, offset) that made them: kept per block and made once at the end
    best_iscale, best_offset = iscale, lo
    for step in range(nstep + 1):
        # as in C, both the step and the offset use the best min found so far
        factor = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        step_iscale = div(factor, torch.where(flat, one, hi - low))
        levels(step_iscale, low, aux)
        torch.mul(wt, aux, out=buf[:, 0])
        torch.mul(buf[:, 0], aux, out=buf[:, 1])
        torch.mul(buf[:, 0], xt, out=buf[:, 2])
        sum_l, sum_l2, sum_xl = seq_sum0(buf_rows)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div0(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = div0(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = this_min > 0
        this_scale = torch.where(positive, div0(sum_xl, sum_l2), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, aux)
        better = (det > 0) & (err < best)
        best = torch.where(better, err, best)
        best_iscale = torch.where(better, step_iscale, best_iscale)
        best_offset = torch.where(better, low, best_offset)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    lv = levels(best_iscale, best_offset, aux)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    lv = torch.where(flat, torch.zeros_like(lv), lv).movedim(0, -1)
    return scale, -torch.where(flat, lo, low), lv.to(torch.uint8)


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x, L, quant_weights): (scale, L in [0, nmax]) per block of the last axis, for
    non-negative x (the k-quants' sub-block scales and mins)."""
    vmax = torch.clamp(x.amax(-1), min=0.0)
    zero = vmax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    w = qw.expand_as(x)
    iscale = div(nmax, vmax)
    lv0 = torch.round(iscale[..., None] * x)
    diff = x - div(1, iscale)[..., None] * lv0
    best_mse = seq_sum(w * diff * diff)
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_s = div(float(np.float32(0.1) * np.float32(s) + np.float32(nmax)), vmax)
        lv = torch.clamp(torch.round(iscale_s[..., None] * x), max=nmax)
        diff = x - div(1, iscale_s)[..., None] * lv
        mse = seq_sum(w * diff * diff)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, iscale_s, iscale)
    lv = torch.clamp(torch.round(iscale[..., None] * x), max=nmax)
    lv, sumlx, suml2 = _refine(x, w, lv, None, nmax, before=True)
    scale = torch.where(zero | (suml2 <= 0), torch.zeros_like(sumlx), div0(sumlx, suml2))
    return scale, torch.where(zero[..., None], torch.zeros_like(lv), lv).to(torch.uint8)


@functools.lru_cache
def _nearest_table(levels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(count of midpoints <= j / 2 for j in [lo, hi], lo, hi): ``best_index`` as a table over floor(2x)."""
    if any(not isinstance(v, int) for v in levels) or list(levels) != sorted(set(levels)):
        raise ValueError(f"best_index needs strictly increasing integer levels, got {levels}")
    mids = [(a + b) / 2 for a, b in zip(levels, levels[1:])]  # half-integers
    lo, hi = int(2 * mids[0]) - 1, int(2 * mids[-1])
    counts = [sum(m <= j / 2 for m in mids) for j in range(lo, hi + 1)]
    return torch.tensor(counts, dtype=torch.long, device=device), lo, hi


def best_index(levels: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """best_index_int8(n, levels, x): the index of the nearest of the sorted integer ``levels`` (as float32),
    the upper one on a tie, as ggml's binary search picks it. Within a bracket [levels[k-1], levels[k]) C
    picks the upper one iff ``!((x - levels[k-1]) < (levels[k] - x))`` in float32. Both sides round
    monotonically in x, so the choice switches once per bracket; for ggml's ``kvalues_iq4nl`` it switches
    exactly at the midpoint (a bisection over every float32 of each bracket in tests/test_ggml_quants.py
    finds it there). The index is then the number of midpoints <= x; they are half-integers, so that number
    depends only on floor(2x) (2x is exact) and is looked up in a table: 4x faster on a CPU than the
    binary search or ``searchsorted``."""
    table, lo, hi = _nearest_table(tuple(levels), x.device)
    return torch.take(table, _table_index(x, lo, hi))


def nearest_level(levels: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """``levels[best_index(levels, x)]`` as float32, in one lookup (for searches that need only the value)."""
    table, lo, hi = nearest_value_table(tuple(levels), x.device)
    return torch.take(table, _table_index(x, lo, hi))


@functools.lru_cache
def nearest_value_table(levels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int, int]:
    """``_nearest_table`` with each entry the level's value (float32) instead of its index."""
    table, lo, hi = _nearest_table(levels, device)
    return torch.tensor(levels, dtype=F32, device=device)[table], lo, hi


def _table_index(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.mul(x, 2).floor_().clamp_(lo, hi).sub_(lo).long()
