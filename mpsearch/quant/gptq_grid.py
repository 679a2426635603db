"""GPTQModel's quantization grid (the ``Quantizer.find_params`` of GPTQ's reference code, per group, min-max):
levels 0 .. 2^b - 1, zero point (2^b)/2 when symmetric, else round(-min / scale); GPTQModel stores the
scales as fp16, so values are decoded with the fp16 scale. Round-to-nearest on that grid (GPTQ's error
compensation changes which level each weight takes, not the grid)."""

from __future__ import annotations

import torch

from mpsearch.core.options import Option


def fake_quantize(w: torch.Tensor, option: Option) -> torch.Tensor:
    rows = w.detach().reshape(w.shape[0], -1).float()
    group = option.group_size or rows.shape[1]
    x = rows.reshape(rows.shape[0], -1, group)
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
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (scale.half().float() * (q - zero)).reshape(w.shape).to(w.dtype)
