"""GPTQModel's quantization grid (the ``Quantizer.find_params`` of GPTQ's reference code, per group, min-max):
levels 0 .. 2^b - 1, zero point (2^b)/2 when symmetric, else round(-min / scale); GPTQModel stores the
scales as fp16, so values are decoded with the fp16 scale. Round-to-nearest on that grid (GPTQ's error
compensation changes which level each weight takes, not the grid)."""

from __future__ import annotations

import torch

from mpsearch.core.options import Option


def grid(x: torch.Tensor, option: Option) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of each group: x is (..., group size), results keep a last dim of 1."""
    maxq = 2**option.bits - 1
    xmin = x.amin(-1, keepdim=True).clamp(max=0)
    xmax = x.amax(-1, keepdim=True).clamp(min=0)
    if option.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if option.symmetric else torch.round(-xmin / scale)
    return scale, zero


def dequantized(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, option: Option) -> torch.Tensor:
    """x rounded to the nearest level of the grid, decoded with the fp16 scale GPTQModel stores."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**option.bits - 1)
    return scale.half().float() * (q - zero)


def fake_quantize(w: torch.Tensor, option: Option) -> torch.Tensor:
    rows = w.detach().reshape(w.shape[0], -1).float()
    x = rows.reshape(rows.shape[0], -1, option.group_size or rows.shape[1])
    return dequantized(x, *grid(x, option), option).reshape(w.shape).to(w.dtype)
