"""llama.cpp's sub-4-bit i-quants on a lattice grid (IQ3_S 3.44 bpw, IQ3_XXS 3.06, IQ2_S 2.56, IQ2_XS 2.31) as
torch, all blocks of a tensor at once.

Ported from ``quantize_row_iq2_xs_impl``, ``quantize_row_iq2_s_impl``, ``quantize_row_iq3_xxs_impl`` and
``quantize_row_iq3_s_impl`` in ggml/src/ggml-quants.c (what ``llama-quantize`` runs), by the rules of
:mod:`mpsearch.quant.ggml_math`. The four share one search, written once here with each type's constants in
a :class:`GridType`: the signs of a block are stored apart (IQ2_XS and IQ3_XXS keep 7 bits per 8 and make the
count of negatives even by flipping the least important weight); the magnitudes go to points of a fixed grid
of 8 (IQ2) or 4 (IQ3) coordinates, each coordinate one of 3 or 8 odd levels. For each of 19 or 31 trial
scales, every group's levels are rounded; a group that lands off the grid takes, of the grid points ggml
lists as its neighbours, the nearest by weighted distance; the trial with the best weighted fit
(``sumqx^2 / sumq2``, C's running comparison) gives the block's scale, and off-grid groups are snapped once
more at that scale. The block scales are then stored as 4-bit multiples of the super-block's fp16 scale.

The grids come from the ``gguf`` package (its ``grid_hex``: ggml's ``kgrid_*`` tables) and the neighbour
lists are built as ``iq2xs_init_impl`` / ``iq3xs_init_impl`` build them (sorted by distance, then index, up
to ``nwant`` distinct distances). Here they are one flat tensor with offsets, so every off-grid group of a
chunk is searched at once: a segment minimum, the first neighbour on a tie, as C's ``d2 < best_d2`` picks.
Same signature as :mod:`mpsearch.quant.kquants`: float32 rows, the columns' importance ``qw`` or None ->
``(packed, values)``; the values are what llama.cpp's ``dequantize_row_iq*`` decodes from the bytes.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from mpsearch.core.errors import MpsearchError
from mpsearch.quant import ggml_numba, iquants_numba
from mpsearch.quant.ggml_math import F32, div, div0, f16, fp16_bytes, seq_sum, sqrt

QK_K = 256
U8 = torch.uint8
I64 = torch.long


@dataclass(frozen=True)
class GridType:
    """One i-quant's constants, as ggml's quantize_row_*_impl spells them."""

    name: str
    gguf_class: str  # gguf.quants class holding the grid (grid_hex, grid_map)
    bits: int  # bits per grid coordinate (levels 0 .. kmax - 1)
    kmax: int  # kMaxQ
    group: int  # coordinates per grid point
    block: int  # weights per block scale
    nwant: int  # neighbour lists hold the points at the nwant smallest distances
    trials: range  # the ``is`` of the trial scales (2 kMaxQ - 1 + is * step) / max
    step: float
    sigma_factor: int  # sigma2 = factor * sum(x^2) / QK_K
    parity: bool  # 7 stored sign bits per 8 weights (count of negatives made even)
    eps: float  # a block whose max |x| is below this (0: equal to 0) is skipped
    start_on_grid: bool  # is_on_grid's initial value (IQ3_S: false)
    snap_all: bool  # the final snap redoes every group, not only those off the grid (IQ3_S)
    fudge: float  # the stored super-block scale is fp16(max_scale / 31 * fudge)
    needs_imatrix: bool
    keep_on_zero: bool  # a super-block whose scales are all 0 keeps its grid bytes (IQ2_S, IQ3_S)


_IQ2 = dict(bits=2, kmax=3, group=8, block=16, trials=range(-9, 10), step=0.1)
_IQ3 = dict(bits=3, kmax=8, group=4, block=32, step=0.2)
TYPES = {
    t.name: t
    for t in (
        GridType("iq2_xs", "IQ2_XS", **_IQ2, nwant=2, sigma_factor=1, parity=True, eps=1e-15, start_on_grid=True,
                 snap_all=False, fudge=1.0, needs_imatrix=True, keep_on_zero=False),
        GridType("iq2_s", "IQ2_S", **_IQ2, nwant=1, sigma_factor=2, parity=False, eps=1e-8, start_on_grid=True,
                 snap_all=False, fudge=0.9875, needs_imatrix=False, keep_on_zero=True),
        GridType("iq3_xxs", "IQ3_XXS", **_IQ3, nwant=2, trials=range(-15, 16), sigma_factor=2, parity=True,
                 eps=1e-8, start_on_grid=True, snap_all=False, fudge=1.0125, needs_imatrix=False, keep_on_zero=False),
        GridType("iq3_s", "IQ3_S", **_IQ3, nwant=3, trials=range(-9, 10), sigma_factor=2, parity=False, eps=0.0,
                 start_on_grid=False, snap_all=True, fudge=1.033, needs_imatrix=False, keep_on_zero=True),
    )
}  # fmt: skip


@functools.lru_cache
def _gather_index_dtype(device: torch.device) -> torch.dtype:
    """int32 where ``gather`` takes it (torch >= 2.8): the neighbour search's gathers are ~25% faster on a CPU."""
    try:
        torch.zeros((1, 1), device=device).gather(1, torch.zeros((1, 1), dtype=torch.int32, device=device))
    except RuntimeError:
        return I64
    return torch.int32


class Grid:
    """A grid's tables on one device: levels of each point, decoded values, the map from a level code to its
    point (-1 off the grid) and the flat neighbour lists of the off-grid codes."""

    def __init__(self, t: GridType, device: torch.device):
        import gguf

        cls = getattr(gguf.quants, t.gguf_class)
        cls.init_grid()  # gguf's decoded grid: (points, group) values of grid_map
        grid_map = np.asarray(cls.grid_map, dtype=np.float32)
        levels = np.searchsorted(grid_map, cls.grid.reshape(-1, t.group)).astype(np.int64)  # (points, group)
        codes = levels @ (1 << (t.bits * np.arange(t.group)))
        kmap = np.full(1 << (t.bits * t.group), -1, dtype=np.int64)
        kmap[codes] = np.arange(len(levels))
        # every code the rounding can reach (levels 0 .. kmax-1) that is off the grid gets its neighbours
        reach = np.array(list(itertools.product(range(t.kmax), repeat=t.group)))[:, ::-1]
        reach_codes = reach @ (1 << (t.bits * np.arange(t.group)))
        off = kmap[reach_codes] < 0
        d2 = ((2 * reach[off][:, None, :] - 2 * levels[None]) ** 2).sum(-1)  # (2l+1) - (2m+1), squared
        order = np.argsort(d2, axis=1, kind="stable")  # by distance, then point index (iq*_compare_func)
        ranked = np.take_along_axis(d2, order, 1)
        counts, flat = np.zeros(len(kmap), dtype=np.int64), []
        for code, dist, idx in zip(reach_codes[off], ranked, order):
            cut = np.unique(dist)[min(t.nwant, len(dist)) - 1]
            n = int(np.searchsorted(dist, cut, side="right"))
            counts[code] = n
            flat.append(idx[:n])
        starts = np.zeros(len(kmap), dtype=np.int64)
        starts[reach_codes[off]] = np.cumsum([0] + [len(f) for f in flat[:-1]])

        def tensor(a, dtype=I64):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

        self.levels = tensor(levels)
        self.q = tensor(2 * levels + 1, F32)  # the quantizer's model of a point: odd levels
        self.odd = tensor(2 * np.arange(t.kmax) + 1, F32)
        self.term_stride = t.group * t.kmax  # terms per group in _snap's table: (coordinate, level)
        self.values = tensor(grid_map[levels], F32)  # what llama.cpp decodes
        self.kmap, self.counts, self.starts = tensor(kmap), tensor(counts), tensor(starts)
        self.flat = tensor(np.concatenate(flat))
        self.shifts = tensor(t.bits * np.arange(t.group))
        self.kmax = t.kmax

    @functools.cached_property
    def buckets(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """The neighbour lists again for the torch port's ``_snap`` (made on first use: the compiled search
        reads the flat lists), padded to a power of two per bucket of lengths, as each neighbour's term offsets
        (coordinate, level); padding points at an extra term that is +inf, so it never wins. Returns (per
        bucket (term offsets (codes, group, width), neighbour points (codes, width)), each code's bucket (-1:
        no list), its row in that bucket)."""
        device = self.levels.device
        levels, counts, starts, flat = (a.cpu().numpy() for a in (self.levels, self.counts, self.starts, self.flat))
        group = levels.shape[1]
        listed = np.nonzero(counts)[0]
        width = np.maximum(4, 1 << np.ceil(np.log2(counts[listed])).astype(np.int64))
        bucket, row = np.full(len(counts), -1), np.zeros(len(counts), dtype=np.int64)
        lists = []
        for b, w in enumerate(np.unique(width)):
            members = listed[width == w]
            bucket[members], row[members] = b, np.arange(len(members))
            offs = np.full((len(members), group, w), self.term_stride, dtype=np.int64)
            points = np.zeros((len(members), w), dtype=np.int64)
            for r, code in enumerate(members):
                idx = flat[starts[code] : starts[code] + counts[code]]
                offs[r, :, : len(idx)] = (levels[idx] + self.kmax * np.arange(group)).T
                points[r, : len(idx)] = idx
            offs_t = torch.as_tensor(offs, dtype=_gather_index_dtype(device), device=device)
            lists.append((offs_t, torch.as_tensor(points, device=device)))
        return lists, torch.as_tensor(bucket, device=device), torch.as_tensor(row, device=device)


@functools.lru_cache(maxsize=16)
def grid(name: str, device: str) -> Grid:
    return Grid(TYPES[name], torch.device(device))


def _snap(g: Grid, levels, xval, waux, scale):
    """Grid point of each group: ``levels`` (..., group) rounded levels, ``xval``/``waux`` the group's
    magnitudes and distance weights (broadcast to levels), ``scale`` (...,) the trial scale. An off-grid
    group takes its nearest neighbour (iq*_find_best_neighbour: sum of w * (scale q - x)^2 in C's order,
    the first of equal distances). Returns (point (...,), on the grid (...,))."""
    code = (levels << g.shifts).sum(-1)
    point = g.kmap[code]
    off = point < 0
    if not bool(off.any()):
        return point, ~off
    code_off = code[off]
    x = xval.expand_as(levels)[off]
    w = waux.expand_as(levels)[off]
    s = scale.expand(off.shape)[off]
    # each coordinate's term w * (scale q - x)^2 (C's float32 expression) takes one of kmax values per group:
    # tabulated once per group (plus a +inf term that padding points at), then each neighbour's distance is
    # C's running sum of looked-up terms, and argmin takes the first of equal distances
    diff = s[:, None, None] * g.odd - x[..., None]  # (groups, coordinate, level)
    terms = torch.empty((len(s), g.term_stride + 1), dtype=F32, device=s.device)
    terms[:, -1] = torch.inf
    torch.mul(w[..., None] * diff, diff, out=terms[:, :-1].view(diff.shape))
    lists, bucket_of, row_of = g.buckets
    bucket, row = bucket_of[code_off], row_of[code_off]
    chosen = torch.empty_like(code_off)
    for b, (offsets, points) in enumerate(lists):
        sel = (bucket == b).nonzero().squeeze(1)
        if len(sel) == 0:
            continue
        r = row[sel]
        offs, t = offsets.index_select(0, r), terms.index_select(0, sel)  # (n, group, width), (n, terms)
        d2 = t.gather(1, offs[:, 0])
        for c in range(1, offs.shape[1]):
            d2 += t.gather(1, offs[:, c])
        chosen[sel] = points.index_select(0, r).gather(1, d2.argmin(1, keepdim=True)).squeeze(1)
    point = point.clone()
    point[off] = chosen
    return point, ~off


def _fit(levels_q, w, xval):
    """(sumqx, sumq2) over the block's last axis, in C's order: w*x*q and w*q*q."""
    return seq_sum(w * xval * levels_q), seq_sum(w * levels_q * levels_q)


def _signs(t: GridType, x, weight):
    """xval = |x| (with the parity flip), and each 8 weights' sign mask (bit i: weight i negative)."""
    xval = torch.where(x >= 0, x, -x)
    neg = (x < 0).reshape(*x.shape[:-1], -1, 8)
    bit = 1 << torch.arange(8, device=x.device, dtype=I64)
    mask = (neg.long() * bit).sum(-1)
    if t.parity:
        odd = neg.sum(-1) % 2 == 1
        imin = (weight * x * x).reshape(neg.shape).argmin(-1)  # first minimum, as C's strict '<'
        mask = torch.where(odd, mask ^ (1 << imin), mask)
        flip = odd[..., None] & (torch.arange(8, device=x.device) == imin[..., None])
        xval = torch.where(flip, -xval.reshape(neg.shape), xval.reshape(neg.shape)).reshape(x.shape)
    return xval, mask


def _weights(t: GridType, x, qw):
    """The block weights: qw * sqrt(sigma2 + x^2), or the type's default without an importance matrix."""
    sup = x.reshape(x.shape[0], -1, QK_K)
    sigma2 = div(seq_sum(sup * sup) * float(t.sigma_factor), QK_K)
    sigma2 = sigma2.repeat_interleave(QK_K // t.block, 1)[..., None]  # per block
    if qw is not None:
        return qw.reshape(1, -1, t.block).to(x.device, F32) * sqrt(sigma2 + x * x)
    if t.needs_imatrix:
        raise MpsearchError(
            f"{t.name} needs an importance matrix (llama.cpp refuses to make it without one)",
            "search with --quantizer imatrix or --imatrix FILE, or use another type",
        )
    if t.name == "iq2_s":
        return 0.25 * sigma2 + x * x
    return x * x


def _trial_numerators(t: GridType) -> list[float]:
    """The trial scales times max: 2 kMaxQ - 1 + is * step for each ``is`` of the type (float32 constants)."""
    return [float(np.float32(2 * t.kmax - 1) + np.float32(s) * np.float32(t.step)) for s in t.trials]


def _block_scales(t: GridType, g: Grid, xval, weight):
    """Each block's scale and grid points: the trial scales, then the final snap. Returns (scale (n, nb),
    points (n, nb, groups), skipped (n, nb))."""
    waux = sqrt(weight)
    vmax = xval.amax(-1)
    skipped = (vmax == 0) if t.eps == 0 else (vmax < t.eps)
    nums = _trial_numerators(t)
    if xval.device.type == "cpu" and ggml_numba.available():  # the same search compiled (same results)
        scale, point = iquants_numba.grid_block_scales(t, g, xval, weight, waux, nums)
    else:
        scale, point = _block_scales_torch(t, g, xval, weight, waux, nums, vmax, skipped)
    return scale, point, skipped


def _block_scales_torch(t: GridType, g: Grid, xval, weight, waux, nums, vmax, skipped):
    """``_block_scales`` as torch on any device, all blocks and trial scales at once: (scale, points)."""
    n, nb, bs = xval.shape
    vmax = torch.where(skipped, torch.ones_like(vmax), vmax)
    ids = div(torch.tensor(nums, dtype=F32, device=xval.device).view(-1, 1, 1), vmax)  # (trials, n, nb)
    groups = (n, nb, bs // t.group, t.group)
    xg, wg = xval.reshape(groups), waux.reshape(groups)
    lv = torch.clamp(torch.round((ids[..., None] * xval - 1) * 0.5), 0, t.kmax - 1).long()
    points, on = _snap(g, lv.reshape(-1, *groups), xg, wg, div(1, ids)[..., None])  # (trials, n, nb, groups)
    q = g.q[points].reshape(-1, n, nb, bs)
    sumqx, sumq2 = _fit(q, weight, xval)
    scale = div(vmax, 2 * t.kmax - 1)
    best = torch.zeros_like(scale)
    choice = torch.full_like(scale, -1, dtype=I64)
    for c in range(len(nums)):
        better = (sumq2[c] > 0) & (sumqx[c] * sumqx[c] > best * sumq2[c])
        scale = torch.where(better, div0(sumqx[c], sumq2[c]), scale)
        best = torch.where(better, scale * sumqx[c], best)
        choice = torch.where(better, c, choice)
    chosen = choice.clamp(min=0)[None, ..., None].expand(1, *points.shape[1:])
    zero_point = g.kmap[0]  # L = 0 (memset) where no trial won
    point = torch.where((choice >= 0)[..., None], points.gather(0, chosen)[0], zero_point)
    on_grid = torch.where((choice >= 0)[..., None], on.gather(0, chosen)[0], t.start_on_grid)
    redo = (~on_grid).any(-1) & (scale > 0)
    if bool(redo.any()):
        inv = div(1, torch.where(redo, scale, 1.0))  # other blocks keep their points; no 1/0 in their rounding
        lv = torch.clamp(torch.round((inv[..., None] * xval - 1) * 0.5), 0, t.kmax - 1).long()
        snapped, _ = _snap(g, lv.reshape(groups), xg, wg, scale[..., None])
        take = redo[..., None] & (torch.ones_like(on_grid) if t.snap_all else ~on_grid)
        point = torch.where(take, snapped, point)
        sqx, sq2 = _fit(g.q[point].reshape(n, nb, bs), weight, xval)
        scale = torch.where(redo & (sq2 > 0), div0(sqx, sq2), scale)
    point = torch.where(skipped[..., None], 0, point)
    return torch.where(skipped, 0.0, scale), point


def quantize(name: str, rows: torch.Tensor, qw: torch.Tensor | None = None):
    """(packed (n, bytes), values (n, k)) of float32 rows ``(n, k * 256)`` in i-quant ``name``."""
    t = TYPES[name]
    g = grid(name, str(rows.device))
    n = rows.shape[0]
    x = rows.reshape(n, -1, t.block)
    weight = _weights(t, x, qw)
    xval, signs = _signs(t, x, weight)
    scale, point, skipped = _block_scales(t, g, xval, weight)
    negative = scale < 0
    scale = scale.abs()
    signs = torch.where(negative[..., None], ~signs & 255, signs)  # full masks; the parity types store 7 bits
    signs = torch.where(skipped[..., None], 0, signs)
    # the super-block: fp16 scale, 4-bit block scales
    per = QK_K // t.block
    sup = scale.reshape(n, -1, per)
    max_scale = sup.amax(-1)
    d = div(max_scale, 31)
    dh = f16(d * t.fudge if t.fudge != 1.0 else d)
    inv = div(1, torch.where(max_scale > 0, d, 1.0))
    ls = torch.clamp(torch.round((inv[..., None] * sup - 1) * 0.5), 0, 15).long()
    empty = max_scale == 0
    ls = torch.where(empty[..., None], 0, ls)
    dh = torch.where(empty, 0.0, dh)
    point = point.reshape(n, -1, per, point.shape[-1])
    signs = signs.reshape(n, -1, per, signs.shape[-1])
    if not t.keep_on_zero:
        point = torch.where(empty[..., None, None], 0, point)
        signs = torch.where(empty[..., None, None], 0, signs)
    values = _decode(t, g, dh, ls, point, signs)
    return _PACK[name](dh, ls, point, signs).reshape(n, -1), values.reshape(rows.shape)


def _decode(t, g, dh, ls, point, signs):
    """dequantize_row_iq*: block scale times grid value, negated where the sign bit is set."""
    lsf = ls.to(F32)
    if t.name == "iq3_s":
        db = dh[..., None] * (1 + 2 * lsf)
    else:
        db = dh[..., None] * (0.5 + lsf) * (0.25 if t.bits == 2 else 0.5)
    n, s, per, groups = point.shape
    v = g.values[point].reshape(n, s, per, -1)
    neg = ((signs[..., None] >> torch.arange(8, device=signs.device)) & 1).reshape(v.shape).bool()
    v = db[..., None] * v
    return torch.where(neg, -v, v)


def _le(v: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Integers (...,) -> their little-endian bytes (..., nbytes) uint8."""
    return torch.stack([(v >> (8 * i)) & 0xFF for i in range(nbytes)], -1).to(U8)


def _nibble_pairs(ls: torch.Tensor) -> torch.Tensor:
    """scales (..., 2m) -> m bytes: scale 2i in the low nibble, 2i + 1 in the high one."""
    return (ls[..., 0::2] | (ls[..., 1::2] << 4)).to(U8)


def _pack_iq2_xs(dh, ls, point, signs):
    qs = point | ((signs & 127) << 9)  # (n, s, 16, 2): uint16 per 8 weights
    n, s = dh.shape
    return torch.cat([fp16_bytes(dh), _le(qs.reshape(n, s, -1), 2).reshape(n, s, -1), _nibble_pairs(ls)], -1)


def _pack_iq2_s(dh, ls, point, signs):
    n, s = dh.shape
    p = point.reshape(n, s, -1)  # 32 grid points of 10 bits
    hi = (p >> 8).reshape(n, s, 8, 4)
    qh = (hi << (2 * torch.arange(4, device=p.device))).sum(-1)
    return torch.cat(
        [fp16_bytes(dh), (p & 255).to(U8), signs.reshape(n, s, -1).to(U8), qh.to(U8), _nibble_pairs(ls)], -1
    )


def _pack_iq3_xxs(dh, ls, point, signs):
    n, s = dh.shape
    packed = ((signs & 127) << (7 * torch.arange(4, device=signs.device))).sum(-1) | (ls << 28)  # uint32 per 32 weights
    return torch.cat([fp16_bytes(dh), point.reshape(n, s, -1).to(U8), _le(packed, 4).reshape(n, s, -1)], -1)


def _pack_iq3_s(dh, ls, point, signs):
    n, s = dh.shape
    qh = ((point >> 8) << torch.arange(8, device=point.device)).sum(-1)  # (n, s, 8): bit k of block ib
    qs = (point & 255).reshape(n, s, -1).to(U8)
    return torch.cat([fp16_bytes(dh), qs, qh.to(U8), signs.reshape(n, s, -1).to(U8), _nibble_pairs(ls)], -1)


_PACK = {"iq2_xs": _pack_iq2_xs, "iq2_s": _pack_iq2_s, "iq3_xxs": _pack_iq3_xxs, "iq3_s": _pack_iq3_s}
QUANTIZERS = {name: functools.partial(quantize, name) for name in TYPES}
NEEDS_IMATRIX = frozenset(name for name, t in TYPES.items() if t.needs_imatrix)
