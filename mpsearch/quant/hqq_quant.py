"""HQQ's own quantizer (``hqq.core.quantize.Quantizer``, the half-quadratic optimizer of scale and zero, the
settings of ``BaseQuantizeConfig``), scale and zero in fp16 as ``HQQLinear`` keeps them."""

from __future__ import annotations

import torch

from mpsearch.core import MpsearchError
from mpsearch.core.options import Option


def require_hqq(what: str) -> None:
    """hqq is an optional package: say how to get it instead of a traceback."""
    import importlib.util

    if importlib.util.find_spec("hqq") is None:
        raise MpsearchError(
            f"{what} needs the hqq package",
            "install mpsearch with its hqq extra: pip install -c constraints.txt -e '.[hqq]'",
        )


def fake_quantize(w: torch.Tensor, option: Option) -> torch.Tensor:
    require_hqq(f"option {option.name!r}")
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = BaseQuantizeConfig(nbits=option.bits, group_size=option.group_size)["weight_quant_params"]
    rows = w.detach().reshape(w.shape[0], -1).float()
    q, meta = Quantizer.quantize(rows, device=str(w.device), compute_dtype=torch.float16, **params)
    meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # as HQQLinear keeps them
    return Quantizer.dequantize(q, meta).reshape(w.shape).to(w.dtype)
