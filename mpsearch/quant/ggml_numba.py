"""Four of ggml's searches compiled for CPUs (numba): the C loops statement by statement; the i-quants' two
live in :mod:`mpsearch.quant.iquants_numba`. The torch ports in ``ggml_math``, ``iquants`` and
``iquants_grid`` call these on a CPU and run themselves on other devices.

- ``make_qkx_quants`` (make_qkx2/3_quants: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K): sequential by definition (each of
  its 16-37 candidate scales starts from the best min so far), so torch vectorizes it over blocks only, one
  candidate at a time: ~16 passes over every weight per candidate, bandwidth-bound on a CPU;
- ``make_qx_quants`` (Q6_K; Q3_K, Q4_0, Q5_0 with an imatrix) and IQ4_NL/IQ4_XS's block scales
  (``iq4_block_scales``): torch tries all 16-20 candidates at once, which holds every weight 16-20 times;
- the grid i-quants' block search (``grid_block_scales``): torch pads and gathers ~40 neighbour distances per
  weight.

Why numba rather than more torch: written once as ggml's scalar loop, a group of blocks stays in cache. The
first three run 64 blocks side by side (``LANES``) so the compiler vectorizes each C statement across blocks;
the grid search is the C loop itself. numba compiles without fast-math, so every float32 operation rounds as
ggml's C does (no FMA contraction; each block's sums in C's order): tests/test_ggml_quants.py and
tests/test_iquants_grid.py check the results equal to the torch ports', and CI's ``llama.cpp`` job checks the
bytes against llama-quantize. Without numba, or with ``MPSEARCH_NUMBA=0``, CPUs run the torch ports. numba is
imported on first use; each kernel is compiled once and cached on disk (``cache=True``).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# blocks searched side by side (the compiler vectorizes across them; a constant count would be unrolled
# instead, so the kernel takes it as an argument), and blocks per thread task
LANES = 64
TASK_BLOCKS = 1 << 11  # a CPU chunk of quantize_rows (2^19 weights) makes 8-16 tasks
MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: (t + MAGIC) - MAGIC is C's nearest_int (ties to even)


@functools.cache
def jit(inline: bool = False):
    """numba's ``njit`` as the kernels here use it (``inline``: a helper compiled into its callers, which
    saves a call and reference counting of each array per call), or None where numba is missing or switched
    off (``MPSEARCH_NUMBA=0``)."""
    if os.environ.get("MPSEARCH_NUMBA", "1") == "0":
        return None
    try:
        from numba import njit
    except ImportError:
        return None
    return njit(nogil=True, cache=True, error_model="numpy", inline="always" if inline else "never")


def available() -> bool:
    return jit() is not None


def run_kernel(search, inputs: tuple, args: tuple, outputs: tuple) -> None:
    """``search(*inputs, *args, *outputs)`` with every array of ``inputs`` and ``outputs`` cut into tasks of
    TASK_BLOCKS rows, on ``torch.get_num_threads()`` threads (the kernels release the GIL)."""

    def task(start: int) -> None:
        part = slice(start, start + TASK_BLOCKS)
        search(*(a[part] for a in inputs), *args, *(a[part] for a in outputs))

    starts = range(0, len(inputs[0]), TASK_BLOCKS)
    threads = min(torch.get_num_threads(), len(starts))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(task, starts))
    else:
        for start in starts:
            task(start)


def lane_blocks(x: torch.Tensor, weights: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, weights) as contiguous float32 arrays (blocks, n) padded with zero blocks to whole groups of LANES
    (a zero block costs nothing and its results are dropped), and the padded count."""
    n = x.shape[-1]
    xs = x.detach().reshape(-1, n).float().numpy()
    ws = weights.detach().expand_as(x).reshape(-1, n).float().numpy()
    padded = -(-xs.shape[0] // LANES) * LANES
    if padded != xs.shape[0]:
        xs, ws = (np.concatenate([a, np.zeros((padded - a.shape[0], n), np.float32)]) for a in (xs, ws))
    return np.ascontiguousarray(xs), np.ascontiguousarray(ws), padded


@functools.cache
def _qkx_kernel():
    f32 = np.float32

    @jit()
    def search(x, w, nmax, rmin, rdelta, nstep, use_mad, lanes, scales, mins, levels):  # pragma: no cover
        """make_qkx*_quants of each row of x (blocks, n), ``lanes`` blocks at a time; element i of every lane
        is one contiguous row, so each C statement runs on all lanes at once. Arguments as in C."""
        n, top = x.shape[1], f32(nmax)
        xt, wt = np.empty((n, lanes), f32), np.empty((n, lanes), f32)
        lev, aux = np.empty((n, lanes), f32), np.empty((n, lanes), f32)
        # one entry per block for each of C's per-block variables
        lo, hi, sum_w, sum_x = np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32)
        span, iscale, scale = np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32)
        best, sum_l, sum_l2 = np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32)
        sum_xl = np.empty(lanes, f32)
        this_scale, this_min, err = np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32)
        flat, better = np.empty(lanes, np.bool_), np.empty(lanes, np.bool_)
        for b0 in range(0, x.shape[0], lanes):
            for k in range(lanes):
                for i in range(n):
                    xt[i, k], wt[i, k] = x[b0 + k, i], w[b0 + k, i]
                lo[k], hi[k] = xt[0, k], xt[0, k]
                sum_w[k] = wt[0, k]
                sum_x[k] = sum_w[k] * xt[0, k]
            for i in range(1, n):
                for k in range(lanes):
                    lo[k] = xt[i, k] if xt[i, k] < lo[k] else lo[k]
                    hi[k] = xt[i, k] if xt[i, k] > hi[k] else hi[k]
                    sum_w[k] += wt[i, k]
                    sum_x[k] += wt[i, k] * xt[i, k]
            for k in range(lanes):
                lo[k] = f32(0) if lo[k] > 0 else lo[k]
                flat[k] = hi[k] == lo[k]  # C returns L = 0, scale 0 (its other results are not used)
                span[k] = f32(1) if flat[k] else hi[k] - lo[k]
                iscale[k] = top / span[k]
                scale[k] = f32(1) / iscale[k]
                best[k] = f32(0)
            for i in range(n):
                for k in range(lanes):
                    lv = min(max((iscale[k] * (xt[i, k] - lo[k]) + MAGIC) - MAGIC, f32(0)), top)
                    lev[i, k] = lv
                    diff = scale[k] * lv + lo[k] - xt[i, k]
                    best[k] += wt[i, k] * (abs(diff) if use_mad else diff * diff)
            for step in range(nstep + 1):
                factor = rmin + rdelta * f32(step) + top
                for k in range(lanes):
                    iscale[k] = factor / span[k]  # span: max - the best min so far, as in C
                    sum_l[k], sum_l2[k], sum_xl[k] = f32(0), f32(0), f32(0)
                for i in range(n):
                    for k in range(lanes):
                        lv = min(max((iscale[k] * (xt[i, k] - lo[k]) + MAGIC) - MAGIC, f32(0)), top)
                        aux[i, k] = lv
                        wl = wt[i, k] * lv
                        sum_l[k] += wl
                        sum_l2[k] += wl * lv
                        sum_xl[k] += wl * xt[i, k]
                for k in range(lanes):
                    det = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k]
                    better[k] = det > 0 and not flat[k]
                    det = det if better[k] else f32(1)
                    this_scale[k] = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / det
                    this_min[k] = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / det
                    if this_min[k] > 0:
                        this_min[k] = f32(0)
                        this_scale[k] = sum_xl[k] / sum_l2[k]
                    err[k] = f32(0)
                for i in range(n):
                    for k in range(lanes):
                        diff = this_scale[k] * aux[i, k] + this_min[k] - xt[i, k]
                        err[k] += wt[i, k] * (abs(diff) if use_mad else diff * diff)
                for k in range(lanes):
                    if better[k] and err[k] < best[k]:
                        best[k], scale[k], lo[k] = err[k], this_scale[k], this_min[k]
                        span[k] = hi[k] - lo[k]
                        for i in range(n):
                            lev[i, k] = aux[i, k]
            for k in range(lanes):
                scales[b0 + k] = f32(0) if flat[k] else scale[k]
                mins[b0 + k] = -lo[k]
                for i in range(n):
                    levels[b0 + k, i] = 0 if flat[k] else np.uint8(lev[i, k])

    return search


def make_qkx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`mpsearch.quant.ggml_math.make_qkx_quants` for CPU tensors: (scale, the_min, L uint8) per block of
    the last axis, on ``torch.get_num_threads()`` threads."""
    search = _qkx_kernel()
    shape, n = x.shape[:-1], x.shape[-1]
    xs, ws, padded = lane_blocks(x, weights)
    blocks = x[..., 0].numel()
    scales, mins = np.empty(padded, np.float32), np.empty(padded, np.float32)
    levels = np.empty((padded, n), np.uint8)
    args = (np.int64(nmax), np.float32(rmin), np.float32(rdelta), np.int64(nstep), bool(use_mad), np.int64(LANES))

    run_kernel(search, (xs, ws), args, (scales, mins, levels))
    scales, mins, levels = scales[:blocks], mins[:blocks], levels[:blocks]
    as_torch = torch.from_numpy
    return as_torch(scales).reshape(shape), as_torch(mins).reshape(shape), as_torch(levels).reshape(*shape, n)


@functools.cache
def _qx_kernel():
    f32 = np.float32
    eps = f32(1e-15)  # GROUP_MAX_EPS: a block whose largest |x| is below it gets scale 0, levels 0

    @jit()
    def search(x, w, nmax, numerators, lanes, scales, levels):  # pragma: no cover
        """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) of each row of x (blocks, n), ``lanes`` blocks at a
        time (element i of every lane one contiguous row): the candidate scales ``numerators / max`` in C's
        order, C's running comparison."""
        n = x.shape[1]
        xt, wt = np.empty((n, lanes), f32), np.empty((n, lanes), f32)
        amax, vmax, scale, best = np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32), np.empty(lanes, f32)
        iscale, best_iscale = np.empty(lanes, f32), np.empty(lanes, f32)
        sumlx, suml2 = np.empty(lanes, f32), np.empty(lanes, f32)
        for b0 in range(0, x.shape[0], lanes):
            for k in range(lanes):
                amax[k], vmax[k] = f32(0), f32(1)
                for i in range(n):  # the first of the largest |x|, with its sign
                    xt[i, k], wt[i, k] = x[b0 + k, i], w[b0 + k, i]
                    if abs(xt[i, k]) > amax[k]:
                        amax[k], vmax[k] = abs(xt[i, k]), xt[i, k]
                vmax[k] = vmax[k] if amax[k] >= eps else f32(1)
            for c in range(numerators.shape[0]):
                for k in range(lanes):
                    iscale[k] = numerators[c] / vmax[k]
                    sumlx[k], suml2[k] = f32(0), f32(0)
                for i in range(n):
                    for k in range(lanes):
                        lv = min(max((iscale[k] * xt[i, k] + MAGIC) - MAGIC, f32(-nmax)), f32(nmax - 1))
                        wl = wt[i, k] * lv
                        sumlx[k] += wt[i, k] * xt[i, k] * lv
                        suml2[k] += wl * lv
                for k in range(lanes):
                    if c == 0:
                        scale[k] = sumlx[k] / suml2[k] if suml2[k] != 0 else f32(0)
                        best[k], best_iscale[k] = scale[k] * sumlx[k], iscale[k]
                    elif suml2[k] > 0 and sumlx[k] * sumlx[k] > best[k] * suml2[k]:
                        scale[k] = sumlx[k] / suml2[k]
                        best[k], best_iscale[k] = scale[k] * sumlx[k], iscale[k]
            for k in range(lanes):
                zero = amax[k] < eps
                scales[b0 + k] = f32(0) if zero else scale[k]
                for i in range(n):
                    lv = min(max((best_iscale[k] * xt[i, k] + MAGIC) - MAGIC, f32(-nmax)), f32(nmax - 1))
                    levels[b0 + k, i] = 0 if zero else np.uint8(lv + f32(nmax))

    return search


def make_qx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, numerators: list[float]):
    """:func:`mpsearch.quant.ggml_math.make_qx_quants` for CPU tensors: (scale, L uint8) per block of the last
    axis; ``weights`` the importance (broadcast to x) or x^2, ``numerators`` the candidates' in C's order."""
    search = _qx_kernel()
    xs, ws, padded = lane_blocks(x, weights)
    scales, levels = np.empty(padded, np.float32), np.empty((padded, x.shape[-1]), np.uint8)
    args = (np.int64(nmax), np.array(numerators, np.float32), np.int64(LANES))

    run_kernel(search, (xs, ws), args, (scales, levels))
    blocks = x[..., 0].numel()
    return torch.from_numpy(scales[:blocks]).reshape(x.shape[:-1]), torch.from_numpy(levels[:blocks]).reshape(x.shape)
