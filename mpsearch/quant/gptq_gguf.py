"""GPTQ on llama.cpp's GGUF types: the same blocks, scales and decoder llama.cpp reads, with the levels chosen
by GPTQ's error feedback instead of rounding each weight to the nearest.

A ``BlockGrid`` is one GGUF type as GPTQ's column loop (:func:`mpsearch.quant.gptq.gptq_columns`) sees it:

- ``fit(block)``: a block's scales (and mins) are llama-quantize's own for the block's weights as GPTQ has
  updated them so far, when the block's first column comes up: the block's bytes from
  :func:`mpsearch.quant.llama_cpp.quantize_rows` (the reference path, no importance matrix), read back into
  each sub-block's decode scale and offset;
- ``snap(column, fit, k)``: the level nearest to each weight of the block's column ``k`` given those, and its
  value exactly as ggml's decoder computes it (``level * scale`` or ``level * scale + min``);
- ``pack(fit, levels)``: the block's bytes with GPTQ's levels in place of the fit's.

F16 is a ``HalfGrid``: each weight's nearest fp16 (llama-quantize's F16 is a plain round-to-nearest-even
cast), GPTQ feeding each weight's rounding error forward, the fp16 bits the stored index.

The written GGUF is a plain llama.cpp file: llama.cpp decodes it as any other of its type. It is not what
``llama-quantize`` would make (that rounds to nearest), so CI's byte-for-byte check covers the round-to-nearest
and imatrix paths, and this one is checked through the decoder (``tests/test_gptq_gguf.py``) and by
llama-perplexity (``experiments/check_llamacpp.py``). Types: the 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
IQ4_NL), IQ4_XS (256-blocks of eight 32-sub-blocks with 6-bit scales) and F16; the k-quants and the grid
i-quants have no grid here, so a GPTQ search has no row for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpsearch.core import MpsearchError
from mpsearch.quant.ggml_math import F32, best_index
from mpsearch.quant.iquants import KVALUES
from mpsearch.quant.legacy import _high_bits, _nibbles

U8 = torch.uint8
SUB = 32  # weights sharing one decode scale and offset, in every type here
F16_MAX = 65504.0  # the largest finite fp16


def _f16_at(b: torch.Tensor, i: int) -> torch.Tensor:
    """The fp16 field at byte ``i`` of each block (..., nbytes) -> float32 (...)."""
    return b[..., i : i + 2].contiguous().view(torch.float16)[..., 0].float()


def _iq4_xs_scales(b: torch.Tensor) -> torch.Tensor:
    """IQ4_XS blocks (..., 136) -> the eight sub-block scales d * (ls - 32) (..., 8), as ggml decodes them."""
    d = _f16_at(b, 0)
    high = b[..., 2].long() | (b[..., 3].long() << 8)
    ib = torch.arange(8, device=b.device)
    low = (b[..., 4 + ib // 2].long() >> (4 * (ib % 2))) & 0xF
    ls = low | (((high[..., None] >> (2 * ib)) & 3) << 4)
    return d[..., None] * (ls.to(F32) - 32)


@dataclass(frozen=True)
class Layout:
    """Where a type's fields sit in its block: the level of each stored index, the bytes before the quants,
    whether a min follows the scale, and how the stored indices are packed."""

    levels: tuple[int, ...]
    head: int
    has_min: bool = False
    high_bits: bool = False  # Q5_0/Q5_1: bit 4 of each index in a 4-byte field before the nibbles
    int8: bool = False  # Q8_0: the indices are the int8 values themselves (offset by 128)


LAYOUTS = {
    "q4_0": Layout(tuple(range(-8, 8)), 2),
    "q5_0": Layout(tuple(range(-16, 16)), 2, high_bits=True),
    "q8_0": Layout(tuple(range(-128, 128)), 2, int8=True),
    "q4_1": Layout(tuple(range(16)), 4, has_min=True),
    "q5_1": Layout(tuple(range(32)), 4, has_min=True, high_bits=True),
    "iq4_nl": Layout(KVALUES, 2),
    "iq4_xs": Layout(KVALUES, 8),
}
TYPES = (*LAYOUTS, "f16")


@dataclass
class Fit:
    """A block's fields (rows, block bytes) and each sub-block's decode scale and offset (rows, subs)."""

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


class BlockGrid:
    """One GGUF type for GPTQ's column loop (see the module docstring); groups are the type's blocks."""

    def __init__(self, option) -> None:
        self.option, self.layout = option, LAYOUTS[option.name]
        self.group_size = option.block_size
        self.uniform = self.layout.levels == tuple(range(self.layout.levels[0], self.layout.levels[-1] + 1))
        self._levels: dict = {}

    def fit(self, block: torch.Tensor) -> Fit:
        from mpsearch.quant.llama_cpp import quantize_rows

        packed, _ = quantize_rows(block.float().contiguous(), self.option)
        if self.option.name == "iq4_xs":
            scale = _iq4_xs_scales(packed)
        else:
            scale = _f16_at(packed, 0)[:, None]
        offset = _f16_at(packed, 2)[:, None] if self.layout.has_min else torch.zeros_like(scale)
        return Fit(packed, scale, offset)

    def snap(self, col: torch.Tensor, fit: Fit, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoded values, stored indices) of the block's column ``k``: the level nearest to each weight."""
        levels = self._levels.get(col.device)
        if levels is None:  # made once per device (snap runs once per column)
            levels = self._levels[col.device] = torch.tensor(self.layout.levels, dtype=F32, device=col.device)
        scale, offset = fit.scale[:, k // SUB], fit.offset[:, k // SUB]
        y = torch.where(scale != 0, (col - offset) / torch.where(scale != 0, scale, 1.0), 0.0)
        if self.uniform:
            idx = torch.clamp(torch.round(y) - self.layout.levels[0], 0, len(self.layout.levels) - 1).long()
        else:
            idx = best_index(self.layout.levels, y)
        values = levels[idx] * scale
        return (values + offset if self.layout.has_min else values), idx

    def packed(self, fits: dict, idx: torch.Tensor) -> torch.Tensor:
        """The tensor's bytes (rows, row bytes) from each block's fit and every weight's stored index."""
        g = self.group_size
        return torch.cat([self.pack(fits[b], idx[:, b * g : (b + 1) * g]) for b in range(idx.shape[1] // g)], 1)

    def pack(self, fit: Fit, idx: torch.Tensor) -> torch.Tensor:
        """The block's bytes (rows, block bytes) with the stored indices ``idx`` (rows, block)."""
        lay, out = self.layout, fit.packed.clone()
        if lay.int8:
            out[:, lay.head :] = (idx - 128).to(torch.int8).view(U8)
            return out
        lv = idx.to(U8).reshape(idx.shape[0], -1, SUB)
        pos = lay.head
        if lay.high_bits:
            out[:, pos : pos + 4] = _high_bits(lv).reshape(idx.shape[0], -1)
            pos += 4
        out[:, pos:] = _nibbles(lv).reshape(idx.shape[0], -1)
        return out


class HalfGrid:
    """F16 for GPTQ's column loop: no groups and nothing to fit; a weight's value is its nearest fp16, its
    stored index that fp16's bits (int16), so the bytes are the fp16 values themselves."""

    group_size = None  # the whole row is one group, fitted once (to nothing)

    def fit(self, cols: torch.Tensor) -> None:
        big = cols.abs().max().item() if cols.numel() else 0.0
        if not big <= F16_MAX:  # inf there would feed NaN into every later column
            raise MpsearchError(
                f"a weight of magnitude {big:g} is beyond fp16's range ({F16_MAX:g}): GPTQ cannot quantize it to f16",
                "leave this layer out of f16 (options=...) or scale the model's weights",
            )
        return None

    def snap(self, col: torch.Tensor, fit: None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        half = col.to(torch.float16)
        return half.float(), half.view(torch.int16)

    def packed(self, fits: dict, idx: torch.Tensor) -> torch.Tensor:
        return idx.contiguous().view(U8)


def grid_for(option) -> BlockGrid | HalfGrid | None:
    """GPTQ's grid for llama.cpp type ``option`` (None: the k-quants and grid i-quants have none)."""
    if option.name == "f16":
        return HalfGrid()
    return BlockGrid(option) if option.name in LAYOUTS else None


def packed_with(w: torch.Tensor, factor, option, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` (out, row) with a layer's ``factor`` on GGUF type ``option``: (the bytes a GGUF holds,
    (out, row / block * block bytes) uint8; the values llama.cpp decodes from them, float32 (out, row))."""
    from mpsearch.quant.gptq import gptq_columns

    grid = grid_for(option)
    values, fits, idx = gptq_columns(w, factor, grid, block_size)
    return grid.packed(fits, idx), values
