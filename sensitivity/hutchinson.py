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

from sensitivity.sums import dot64

MatVec = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class TraceEstimate:
    trace: torch.Tensor  # one value per block (float64)
    stderr: torch.Tensor  # standard error of each value
    matvecs: int  # whole-model products used


def rademacher(
    shapes: list[torch.Size], generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """+-1 probes on the generator's device, in ``dtype`` (exact in any float format: a bf16 model's probes
    take half the memory of float32 ones)."""
    dev = generator.device
    return [torch.randint(0, 2, s, generator=generator, device=dev, dtype=dtype).mul_(2).sub_(1) for s in shapes]


def _block_dots(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per block x . y in float64 (on the CPU), with bounded temporaries."""
    return torch.tensor([dot64(x, y) for x, y in zip(a, b)], dtype=torch.float64, device="cpu")


# quad(first, count) -> (count, blocks): v_i . (H v_i) per block for probes i = first .. first + count - 1
Quad = Callable[[int, int], torch.Tensor]


def seeded_probes(
    shapes: list[torch.Size], seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """probe(i): the i-th Rademacher probe, regenerated on demand from (seed, i) so none has to be kept."""

    def probe(i: int) -> list[torch.Tensor]:
        return rademacher(shapes, torch.Generator(device=device).manual_seed(seed * 1_000_003 + i), dtype)

    return probe


def matvec_quad(matvec: MatVec, probe: Callable[[int], list[torch.Tensor]]) -> Quad:
    """A Quad from a whole-vector product (explicit matrices in tests, Hutch++-style callers)."""
    return lambda first, count: torch.stack(
        [_block_dots(v, matvec(v)) for v in (probe(i) for i in range(first, first + count))]
    )


def hutchinson(
    quad: Quad,
    min_probes: int = 8,
    max_probes: int = 64,
    rtol: float = 0.1,
    on_probe: Callable[[int], None] | None = None,
    round_size: int = 8,
) -> TraceEstimate:
    """Rademacher probes in rounds until every block's relative standard error is below ``rtol`` (or
    ``max_probes``). The first round has ``min_probes`` probes, later ones ``round_size``: a round lets a
    caller that recomputes its graph per batch share that graph among the round's probes."""
    samples = torch.zeros(0, 0, dtype=torch.float64, device="cpu")
    while len(samples) < max_probes:
        count = min(max(min_probes, 2) if len(samples) == 0 else round_size, max_probes - len(samples))
        new = quad(len(samples), count).double()
        samples = new if len(samples) == 0 else torch.cat([samples, new])
        if on_probe:
            on_probe(count)
        stderr = samples.std(0) / len(samples) ** 0.5
        if len(samples) >= 2 and torch.all(stderr <= rtol * samples.mean(0).abs()):
            break
    stderr = samples.std(0) / len(samples) ** 0.5 if len(samples) > 1 else torch.full_like(samples[0], float("inf"))
    return TraceEstimate(samples.mean(0), stderr, len(samples))


def hutchpp(
    matvec: MatVec,
    shapes: list[torch.Size],
    generator: torch.Generator,
    sketch: int = 8,
    probes: int = 16,
    on_probe: Callable[[int], None] | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021) per block, all products shared across blocks.

    1. ``sketch`` products Y = H S; per block, Q_l = orth(Y_l) spans the block's dominant directions.
    2. tr(Q_l^T H_ll Q_l): column j of every block's Q, each block with a random sign, in one product;
       the signs cancel cross-block terms in expectation. Two sign draws per column give its variance.
    3. tr(P_l H_ll P_l) with P_l = I - Q_l Q_l^T: Hutchinson on deflated probes (``probes`` products).
    Products: 3 * sketch + probes. Memory: the sketch keeps ``sketch`` float64 copies of the weights'
    shape (Hutchinson keeps none): for big models lower ``sketch`` or use Hutchinson. Unbiased for any H;
    sharpest when each layer's block is low-rank and layers are weakly coupled. Strong cross-layer coupling
    puts its noise into step 2 (plain Hutchinson, the default, is then the better use of the same products).
    """
    tick = (lambda: on_probe(1)) if on_probe else (lambda: None)
    ys = []
    for _ in range(sketch):
        s = rademacher(shapes, generator)
        ys.append([y.reshape(-1).double() for y in matvec(s)])
        tick()
    qs = [torch.linalg.qr(torch.stack([y[b] for y in ys], 1)).Q for b in range(len(shapes))]
    low = torch.zeros(len(shapes), dtype=torch.float64, device="cpu")
    low_var = torch.zeros_like(low)
    for j in range(sketch):
        draws = []
        for _ in range(2):
            signs = rademacher([torch.Size([len(shapes)])], generator)[0].double()
            cols = [(signs[b] * q[:, j] if j < q.shape[1] else q.new_zeros(q.shape[0])) for b, q in enumerate(qs)]
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
