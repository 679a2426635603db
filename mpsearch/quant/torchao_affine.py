"""torchao's affine quantization, as ``IntxWeightOnlyConfig`` applies it (``IntxUnpackedToInt8Tensor.from_hp``):
``choose_qparams_affine`` with the int range [-2^(b-1), 2^(b-1)-1], int8 zero points, scales in the weight's
dtype, then ``quantize_affine`` / ``dequantize_affine``: the tensors the exported model computes with."""

from __future__ import annotations

import torch

from mpsearch.core import MpsearchError
from mpsearch.core.options import Option


def require_torchao() -> None:
    """torchao is an optional package (the ``test`` extra installs it): say so instead of a traceback."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise MpsearchError(
            "torchao options and exports need the torchao package",
            "install mpsearch with its torchao extra: pip install -c constraints.txt -e '.[torchao]'",
        )


def fake_quantize(w: torch.Tensor, option: Option) -> torch.Tensor:
    require_torchao()
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    rows = w.detach().reshape(w.shape[0], -1)
    block = (1, option.group_size or rows.shape[1])
    qmin, qmax = -(2 ** (option.bits - 1)), 2 ** (option.bits - 1) - 1
    mapping = MappingType.SYMMETRIC if option.symmetric else MappingType.ASYMMETRIC
    scale, zero = choose_qparams_affine(
        rows, mapping, block, torch.int8, qmin, qmax, zero_point_dtype=torch.int8, keepdim=True
    )
    q = quantize_affine(rows, block, scale, zero, torch.int8, qmin, qmax)
    return dequantize_affine(q, block, scale, zero, torch.int8, qmin, qmax, output_dtype=w.dtype).reshape(w.shape)
