"""HQQ's own quantizer (``hqq.core.quantize.Quantizer``, the half-quadratic optimizer of scale and zero, the
settings of ``BaseQuantizeConfig``), scale and zero in fp16 as ``HQQLinear`` keeps them."""

from __future__ import annotations

import torch

from mpsearch.core import MpsearchError
from mpsearch.core.options import Option


def fake_quantize(w: torch.Tensor, option: Option) -> torch.Tensor:
    try:
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except ImportError:
        raise MpsearchError(f"option {option.name!r} needs the hqq package", "pip install hqq") from None
    params = BaseQuantizeConfig(nbits=option.bits, group_size=option.group_size)["weight_quant_params"]
    rows = w.detach().reshape(w.shape[0], -1).float()
    q, meta = Quantizer.quantize(rows, device=str(w.device), compute_dtype=torch.float16, **params)
    meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # as HQQLinear keeps them
    return Quantizer.dequantize(q, meta).reshape(w.shape).to(w.dtype)
