"""The i-quants' searches compiled for CPUs (numba), as :mod:`mpsearch.quant.ggml_numba` compiles ggml's
k-quant searches (see there for why and how): IQ4_NL/IQ4_XS's block scale search (``iq4_block_scales``, for
``iquants._block_scales``) and the grid i-quants' block search (``grid_block_scales``, for
``iquants_grid._block_scales``). Same results as the torch ports (tests/test_ggml_quants.py,
tests/test_iquants_grid.py).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from mpsearch.quant.ggml_math import nearest_value_table
from mpsearch.quant.ggml_numba import LANES, jit, lane_blocks, run_kernel


@functools.cache
def _grid_kernel(group: int):
    """The grid i-quants' block search for points of ``group`` coordinates (a constant of the compiled code:
    its loops unroll)."""
    f32 = np.float32

    @jit(inline=True)
    def levels(x, g0, inv, kmax, bits):  # pragma: no cover
        """The code of a group's rounded levels round((inv x - 1) / 2) in [0, kmax)."""
        code = 0
        for i in range(group):
            lv = min(max(np.rint((inv * x[g0 + i] - f32(1)) * f32(0.5)), f32(0)), f32(kmax - 1))
            code |= np.int64(lv) << (bits * i)
        return code

    @jit(inline=True)
    def nearest(kmap, counts, starts, flat, q, code, scale, x, w, g0):  # pragma: no cover
        """The grid point of rounded levels ``code`` for the group at x[g0:g0+group]: its own, or of ggml's
        neighbours of an off-grid code the first nearest by sum of w * (scale q - x)^2 (iq*_find_best_neighbour,
        line by line)."""
        point = kmap[code]
        if point >= 0:
            return point, True
        start = starts[code]
        best_d2, point = f32(np.inf), flat[start]
        for j in range(counts[code]):
            p = flat[start + j]
            d2 = f32(0)
            for i in range(group):
                diff = scale * q[p, i] - x[g0 + i]
                d2 += w[g0 + i] * diff * diff
            if d2 < best_d2:
                best_d2, point = d2, p
        return point, False

    @jit(inline=True)
    def fit(q, points, w, x):  # pragma: no cover
        """(sumqx, sumq2) of a block's points, in C's order: w*x*q and w*q*q."""
        sumqx, sumq2 = f32(0), f32(0)
        for k in range(points.shape[0]):
            for j in range(group):
                v, i = q[points[k], j], k * group + j
                sumqx += w[i] * x[i] * v
                sumq2 += w[i] * v * v
        return sumqx, sumq2

    @jit()
    def search(xval, weight, waux, nums, kmax, bits, eps, start_on_grid, snap_all, kmap, counts, starts, flat, q,
               scales, points):  # pragma: no cover  # fmt: skip
        """Each block's scale and grid points (``iquants_grid._block_scales``, one block at a time)."""
        ngroups = xval.shape[1] // group
        top = f32(2 * kmax - 1)
        trial, trial_on, on = np.empty(ngroups, np.int64), np.empty(ngroups, np.bool_), np.empty(ngroups, np.bool_)
        for b in range(xval.shape[0]):
            x, w, wa, best_points = xval[b], weight[b], waux[b], points[b]
            vmax = x.max()
            if (vmax == 0) if eps == 0 else (vmax < eps):
                scales[b] = 0
                best_points[:] = 0
                continue
            scale, best, chosen = vmax / top, f32(0), False
            for c in range(nums.shape[0]):
                inv = nums[c] / vmax
                s = f32(1) / inv
                for k in range(ngroups):
                    code = levels(x, k * group, inv, kmax, bits)
                    trial[k], trial_on[k] = nearest(kmap, counts, starts, flat, q, code, s, x, wa, k * group)
                sumqx, sumq2 = fit(q, trial, w, x)
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best, chosen = scale * sumqx, True
                    best_points[:], on[:] = trial, trial_on
            if not chosen:  # L = 0 (C's memset)
                best_points[:], on[:] = kmap[0], start_on_grid
            if scale > 0 and not on.all():
                inv = f32(1) / scale
                for k in range(ngroups):
                    if snap_all or not on[k]:
                        code = levels(x, k * group, inv, kmax, bits)
                        best_points[k] = nearest(kmap, counts, starts, flat, q, code, scale, x, wa, k * group)[0]
                sumqx, sumq2 = fit(q, best_points, w, x)
                if sumq2 > 0:
                    scale = sumqx / sumq2
            scales[b] = scale

    return search


def grid_block_scales(t, g, xval: torch.Tensor, weight: torch.Tensor, waux: torch.Tensor, nums: list[float]):
    """:func:`mpsearch.quant.iquants_grid._block_scales` for CPU tensors: (scale (n, nb), points (n, nb,
    groups)); ``waux`` = sqrt(weight), ``nums`` the trial scales' numerators."""
    search = _grid_kernel(t.group)
    n, nb, bs = xval.shape
    xs, ws, was = (a.detach().reshape(-1, bs).contiguous().numpy() for a in (xval, weight, waux))
    blocks = xs.shape[0]
    scales, points = np.empty(blocks, np.float32), np.empty((blocks, bs // t.group), np.int64)
    tables = (g.kmap.numpy(), g.counts.numpy(), g.starts.numpy(), g.flat.numpy(), g.q.numpy())
    args = (np.array(nums, np.float32), t.kmax, t.bits, np.float32(t.eps), t.start_on_grid, t.snap_all, *tables)
    run_kernel(search, (xs, ws, was), args, (scales, points))
    return torch.from_numpy(scales).reshape(n, nb), torch.from_numpy(points).reshape(n, nb, -1)


@functools.cache
def _iq4_kernel():
    f32 = np.float32
    eps = f32(1e-15)  # a block whose largest |x| is below it gets scale 0

    @jit()
    def search(x, w, inv0, trials, values, lo, hi, lanes, scales):  # pragma: no cover
        """IQ4's block scale (``iquants._block_scales``) of each row of x (blocks, 32), ``lanes`` blocks at a
        time: the first guess ``inv0 / max`` then ``trials / max``, each weight at its nearest level
        (``values``: the level's value by floor(2 id x) from ``lo`` to ``hi``), C's running comparison."""
        n = x.shape[1]
        q, xt, wt = np.empty((n, lanes), f32), np.empty((n, lanes), f32), np.empty((n, lanes), f32)
        amax, vmax, d, best = np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32)
        inv, sumqx, sumq2 = np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32)
        for b0 in range(0, x.shape[0], lanes):
            for k in range(lanes):
                amax[k], vmax[k] = f32(0), f32(1)
                for i in range(n):  # the first of the largest |x|, with its sign (C's `if (ax > amax)`)
                    xt[i, k], wt[i, k] = x[b0 + k, i], w[b0 + k, i]
                    if abs(xt[i, k]) > amax[k]:
                        amax[k], vmax[k] = abs(xt[i, k]), xt[i, k]
                vmax[k] = vmax[k] if amax[k] >= eps else f32(1)
            for c in range(trials.shape[0] + 1):
                for k in range(lanes):
                    inv[k] = f32(1) / (-vmax[k] / inv0) if c == 0 else trials[c - 1] / vmax[k]
                    sumqx[k], sumq2[k] = f32(0), f32(0)
                for i in range(n):
                    for k in range(lanes):
                        t = min(max(np.floor(f32(2) * (inv[k] * xt[i, k])), lo), hi)
                        q[i, k] = values[np.int64(t - lo)]
                for i in range(n):
                    for k in range(lanes):
                        wq = wt[i, k] * q[i, k]
                        sumqx[k] += wq * xt[i, k]
                        sumq2[k] += wq * q[i, k]
                for k in range(lanes):
                    if c == 0:
                        d[k] = sumqx[k] / sumq2[k] if sumq2[k] != 0 else f32(0)
                        best[k] = d[k] * sumqx[k]
                    elif sumq2[k] > 0 and sumqx[k] * sumqx[k] > best[k] * sumq2[k]:
                        d[k] = sumqx[k] / sumq2[k]
                        best[k] = d[k] * sumqx[k]
            for k in range(lanes):
                scales[b0 + k] = d[k] if amax[k] >= eps else f32(0)

    return search


def iq4_block_scales(x: torch.Tensor, weight: torch.Tensor, kvalues: tuple[int, ...], ntry: int) -> torch.Tensor:
    """:func:`mpsearch.quant.iquants._block_scales` for CPU tensors: each 32-block's scale (x.shape[:-1])."""
    search = _iq4_kernel()
    table, lo, hi = nearest_value_table(tuple(kvalues), torch.device("cpu"))
    xs, ws, padded = lane_blocks(x, weight)
    scales = np.empty(padded, np.float32)
    trials = np.array([t + kvalues[0] for t in range(-ntry, ntry + 1)], np.float32)
    args = (np.float32(kvalues[0]), trials, table.numpy(), np.float32(lo), np.float32(hi), np.int64(LANES))
    run_kernel(search, (xs, ws), args, (scales,))
    return torch.from_numpy(scales[: x[..., 0].numel()]).reshape(x.shape[:-1])
