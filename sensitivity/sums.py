"""Float64 sums over weight-sized tensors with bounded temporaries.

``x.double()`` (and ``x.sum(dtype=torch.float64)``) materializes a float64 copy: for an LLM's lm_head that is
a GiB, more than the whole estimate may spend. These helpers walk dim 0 in chunks of about ``CHUNK``
elements (views, so a transposed Conv1D weight is not copied either) and accumulate in float64.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 22  # elements per float64 temporary (32 MiB)


def _chunks(*tensors: torch.Tensor | None):
    lead = tensors[0]
    if lead.dim() == 0:
        yield tensors
        return
    rows = max(1, CHUNK // max(1, lead[0].numel()))
    for i in range(0, lead.shape[0], rows):
        yield tuple(None if t is None else t[i : i + rows] for t in tensors)


def dot64(a: torch.Tensor, b: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> float:
    """sum(weight * a * b) in float64; ``b`` defaults to ``a`` (a sum of squares), ``weight`` to 1."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for ca, cb, cw in _chunks(a, b, weight):
        part = ca.double()
        part = part.square_() if cb is None else part.mul_(cb)
        if cw is not None:
            part.mul_(cw)
        total += part.sum()
    return float(total)


def sum64(x: torch.Tensor) -> float:
    """sum(x) in float64."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for (chunk,) in _chunks(x):
        total += chunk.double().sum()
    return float(total)
