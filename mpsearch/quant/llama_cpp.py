"""llama.cpp's GGUF types, quantized exactly as ``llama-quantize`` does, on the weights' own device.

One torch port per type family: :mod:`mpsearch.quant.legacy` (Q4_0 ... Q8_0), :mod:`mpsearch.quant.kquants` (Q2_K
... Q6_K), :mod:`mpsearch.quant.iquants` (IQ4_NL, IQ4_XS), :mod:`mpsearch.quant.iquants_grid` (IQ3_S, IQ3_XXS,
IQ2_S, IQ2_XS). Each takes the importance of the row's columns (``imatrix``: llama.cpp's importance matrix entry of
the tensor, the mean squared activation of each input; None: llama-quantize without ``--imatrix``) and returns the
bytes a GGUF holds and the values llama.cpp decodes from them. Rows go through in chunks sized for the device: on a
CPU, a chunk whose temporaries stay in cache is several times faster than the whole tensor; on an accelerator,
large chunks amortize the kernel launches.
"""

from __future__ import annotations

import numpy as np
import torch

from mpsearch.core.options import Option
from mpsearch.quant import ggml_numba, iquants, iquants_grid, kquants, legacy

QUANTIZERS = {**legacy.QUANTIZERS, **kquants.QUANTIZERS, **iquants.QUANTIZERS, **iquants_grid.QUANTIZERS}
# weights per chunk on a CPU for the torch ports, (reference, with an imatrix), measured on 256 x 14336 rows on
# 2 cores: searches that try every candidate scale at once want small chunks, those that loop over them larger ones
CPU_CHUNK = {
    "q6_k": (1 << 17, 1 << 17),
    "q3_k": (1 << 20, 1 << 18),
    "q4_0": (1 << 19, 1 << 16),
    "q5_0": (1 << 19, 1 << 16),
    "iq4_nl": (1 << 16, 1 << 16),
    "iq4_xs": (1 << 16, 1 << 16),
    # the grid i-quants' neighbour search holds ~10-60 candidate points per group and trial scale
    **{name: (1 << 14, 1 << 14) for name in iquants_grid.TYPES},
}
CPU_CHUNK_DEFAULT = (1 << 19, 1 << 19)
# with numba the searches run compiled (mpsearch.quant.ggml_numba), each chunk cut into tasks for every thread:
# chunks of at least the default keep the threads busy
# on an accelerator: large chunks, but the grid i-quants' neighbour search holds every trial scale's padded
# neighbour lists at once: peak ~1 GiB at 2^18 weights (IQ2_XS; IQ3_S ~0.55 GiB, measured on a CPU)
ACCELERATOR_CHUNK = {name: 1 << 18 for name in iquants_grid.TYPES}
ACCELERATOR_CHUNK_DEFAULT = 1 << 25


def ggml_type(option: Option):
    import gguf

    return gguf.GGMLQuantizationType[option.name.upper()]


def _chunk_rows(name: str, rows: torch.Tensor, weighted: bool) -> int:
    cpu = CPU_CHUNK.get(name, CPU_CHUNK_DEFAULT)[weighted]
    if ggml_numba.available():
        cpu = max(cpu, CPU_CHUNK_DEFAULT[weighted])
    budget = cpu if rows.device.type == "cpu" else ACCELERATOR_CHUNK.get(name, ACCELERATOR_CHUNK_DEFAULT)
    return max(1, budget // max(rows.shape[1], 1))


def quantize_rows(rows, option: Option, imatrix=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes (n, row / block * block_bytes) uint8 as llama.cpp stores them, their decoded float32 values
    (n, row)) for rows (a tensor on any device, or an array) whose length is a multiple of the type's block
    size; ``imatrix``: the columns' importance (row,) or None. Both results are on the rows' device."""
    rows = (rows.detach() if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows))).float()
    qw = None if imatrix is None else torch.as_tensor(imatrix, dtype=torch.float32, device=rows.device)
    fn = QUANTIZERS[option.name]
    extra = {}
    if option.name in legacy.QUANTIZERS and qw is not None:  # a whole row's sum, not a chunk's
        extra["sigma2"] = legacy.row_sigma2(rows)
    step = _chunk_rows(option.name, rows, qw is not None)
    packed, values = [], []
    for start in range(0, rows.shape[0], step):
        part = {k: v[start : start + step] for k, v in extra.items()}
        p, v = fn(rows[start : start + step].contiguous(), qw, **part)
        packed.append(p)
        values.append(v)
    return torch.cat(packed), torch.cat(values)


def fake_quantize(w: torch.Tensor, option: Option, imatrix=None) -> torch.Tensor:
    """Q(w) for rows that are whole blocks (``quantize_weight`` pads the others), on w's device."""
    rows = w.detach().reshape(w.shape[0], -1)
    _, values = quantize_rows(rows, option, imatrix)
    return values.reshape(w.shape).to(w.dtype)
