"""Per-block trace estimation from shared matrix-vector products (Hutchinson and Hutch++).

``matvec`` maps a list of tensors (one block per layer) to H applied to their concatenation. Every product
is a whole-model product; each layer's trace comes from its own block of the probe and of the product:
E[v_l . (H v)_l] = tr(H_ll) for independent zero-mean probes, because cross-block terms vanish in expectation.
So one product per probe serves every layer at once (never one product per layer).

Written here because no maintained library estimates per-block traces from shared products with standard
errors (PyHessian does the global trace only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MatVec = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class TraceEstimate:
    trace: torch.Tensor  # one value per block (float64)
    stderr: torch.Tensor  # standard error of each value
    matvecs: int  # whole-model products used


def rademacher(shapes: list[torch.Size], generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, 2, s, generator=generator).float() * 2 - 1 for s in shapes]


def _block_dots(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)])


def hutchinson(
    matvec: MatVec,
    shapes: list[torch.Size],
    generator: torch.Generator,
    min_probes: int = 8,
    max_probes: int = 64,
    rtol: float = 0.1,
    on_probe: Callable[[], None] | None = None,
) -> TraceEstimate:
    """Rademacher probes until every block's relative standard error is below ``rtol`` (or max_probes)."""
    samples = []
    while len(samples) < max_probes:
        v = rademacher(shapes, generator)
        samples.append(_block_dots(v, matvec(v)))
        if on_probe:
            on_probe()
        if len(samples) >= max(min_probes, 2):
            stacked = torch.stack(samples)
            stderr = stacked.std(0) / len(samples) ** 0.5
            if torch.all(stderr <= rtol * stacked.mean(0).abs()):
                break
    stacked = torch.stack(samples)
    stderr = stacked.std(0) / len(samples) ** 0.5 if len(samples) > 1 else torch.full_like(stacked[0], float("inf"))
    return TraceEstimate(stacked.mean(0), stderr, len(samples))


def hutchpp(
    matvec: MatVec,
    shapes: list[torch.Size],
    generator: torch.Generator,
    sketch: int = 8,
    probes: int = 16,
    on_probe: Callable[[], None] | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021) per block, all products shared across blocks.

    1. ``sketch`` products Y = H S; per block, Q_l = orth(Y_l) spans the block's dominant directions.
    2. tr(Q_l^T H_ll Q_l): column j of every block's Q, each block with a random sign, in one product;
       the signs cancel cross-block terms in expectation. Two sign draws per column give its variance.
    3. tr(P_l H_ll P_l) with P_l = I - Q_l Q_l^T: Hutchinson on deflated probes (``probes`` products).
    Products: 3 * sketch + probes. Unbiased for any H; sharpest when each layer's block is low-rank and
    layers are weakly coupled. Strong cross-layer coupling puts its noise into step 2 (plain Hutchinson,
    the default, is then the better use of the same products).
    """
    tick = on_probe or (lambda: None)
    ys = []
    for _ in range(sketch):
        s = rademacher(shapes, generator)
        ys.append([y.reshape(-1).double() for y in matvec(s)])
        tick()
    qs = [torch.linalg.qr(torch.stack([y[b] for y in ys], 1)).Q for b in range(len(shapes))]
    low = torch.zeros(len(shapes), dtype=torch.float64)
    low_var = torch.zeros_like(low)
    for j in range(sketch):
        draws = []
        for _ in range(2):
            signs = rademacher([torch.Size([len(shapes)])], generator)[0].double()
            cols = [
                (signs[b] * q[:, j] if j < q.shape[1] else torch.zeros(q.shape[0], dtype=torch.float64))
                for b, q in enumerate(qs)
            ]
            hz = matvec([c.float().reshape(sh) for c, sh in zip(cols, shapes)])
            draws.append(_block_dots(cols, [h.reshape(-1) for h in hz]))  # cols carry the signs
            tick()
        low += (draws[0] + draws[1]) / 2
        low_var += (draws[0] - draws[1]) ** 2 / 4
    samples = []
    for _ in range(probes):
        g = [r.reshape(-1).double() for r in rademacher(shapes, generator)]
        g = [x - q @ (q.T @ x) for x, q in zip(g, qs)]
        hg = matvec([x.float().reshape(sh) for x, sh in zip(g, shapes)])
        samples.append(_block_dots(g, [h.reshape(-1) for h in hg]))
        tick()
    stacked = torch.stack(samples)
    resid_var = stacked.var(0) / probes if probes > 1 else torch.zeros_like(low)
    return TraceEstimate(low + stacked.mean(0), (low_var + resid_var).sqrt(), 3 * sketch + probes)
