"""llama.cpp's GGUF types: llama.cpp's reference quantizers, gguf's dequantizers.

Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 use the ``gguf`` package's quantizers (ports of ggml's reference code); the
k-quants use :mod:`mpsearch.quant.kquants` (the package has no k-quant quantizers). Values always come from
decoding the very bytes a GGUF file would hold.
"""

from __future__ import annotations

import numpy as np
import torch

from mpsearch.core.options import Option
from mpsearch.quant.kquants import QUANTIZERS


def ggml_type(option: Option):
    import gguf

    return gguf.GGMLQuantizationType[option.name.upper()]


def quantize_rows(rows: np.ndarray, option: Option) -> tuple[np.ndarray, np.ndarray]:
    """(bytes (n, row / block * block_bytes) as llama.cpp stores them, their dequantized float32 values (n, row))
    for float32 rows whose length is a multiple of the type's block size."""
    import gguf

    n = rows.shape[0]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if option.name in QUANTIZERS:
        packed, values = QUANTIZERS[option.name](rows.reshape(-1, option.block_size))
        return packed.reshape(n, -1), values.reshape(n, -1)
    packed = gguf.quants.quantize(rows, ggml_type(option))
    return packed, gguf.quants.dequantize(packed, ggml_type(option))


def fake_quantize(w: torch.Tensor, option: Option) -> torch.Tensor:
    """Q(w) for rows that are whole blocks (``quantize_weight`` pads the others)."""
    rows = w.detach().reshape(w.shape[0], -1).float().cpu().numpy()
    _, values = quantize_rows(rows, option)
    return torch.from_numpy(values).reshape(w.shape).to(w.device, w.dtype)
