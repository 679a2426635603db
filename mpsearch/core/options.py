"""Quantization options: names -> :class:`Option`, and their exact storage.

Each runtime (``mpsearch.runtimes``, one registration per format family) owns a grammar of names, its exact
storage bits and the row lengths it stores; an ``Option`` records its ``runtime`` and asks it. The families:

- mpsearch's own: ``int{b}[_g{G}][_asym]`` (b in 2..8; per output channel, or one scale per group of G input
  elements), ``fp8_e4m3``, ``fp8_e5m2`` (per channel), ``fp4_e2m1[_g{G}]`` (group 32 by default), ``fp16``;
  fp16 scales (16 bits) and b-bit zero points count in the effective bits;
- llama.cpp GGUF types (``q8_0 ... q2_k``), ``torchao:int{b}...``, ``gptq:int{b}...``, ``hqq:int{b}_g{G}``:
  see ``mpsearch/runtimes/<runtime>.py`` for each one's storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from mpsearch.core.errors import InvalidOptionError


def _runtimes():
    import mpsearch.runtimes  # registers every runtime; no torch at import

    return mpsearch.runtimes


def bits_error(name: str, runtime: str, bits: int, allowed: tuple) -> InvalidOptionError:
    """The one message for an option whose runtime has no weights of that many bits."""
    return InvalidOptionError(f"option {name!r}: {runtime} has no {bits}-bit weights", f"use bits in {allowed}")


@dataclass(frozen=True)
class Option:
    """One quantization format for a layer's weight."""

    name: str
    kind: str  # "int", "fp" or "none"
    bits: int  # bits per stored element
    symmetric: bool = True
    group_size: int | None = None  # None: one scale per output channel
    exponent_bits: int = 0
    mantissa_bits: int = 0
    runtime: str = "mpsearch"  # whose storage and quantization math: mpsearch, llama.cpp, torchao, gptq, hqq
    block_size: int = 0  # GGUF types: weights per block along a row
    block_bytes: int = 0  # GGUF types: bytes per block

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the runtime can store a weight of this shape (see ``fits_row``)."""
        return bool(self.fits_row(math.prod(shape[1:]) if len(shape) > 1 else 1))

    def fits_row(self, row_length):
        """Whether rows of this length (an int or a numpy array) can be stored: a GGUF row must be whole
        blocks, a runtime's group-wise row whole groups (mpsearch's own formats pad the last group)."""
        return _runtimes().runtime_of(self).fits_row(self, row_length)

    def n_scales(self, shape: tuple[int, ...]) -> int:
        """Number of scales stored for a weight of this shape (dim 0 = output channels)."""
        return int(self.scales_for(shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1))

    def scales_for(self, out_channels, row_length):
        """``n_scales`` from output channels and row length (ints, or numpy arrays for many layers)."""
        return _runtimes().runtime_of(self).scales_for(self, out_channels, row_length)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Total bits to store a weight of ``shape``: elements + scales + zero points, as the runtime does."""
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        return int(self.storage_bits_for(shape[0], row))

    def storage_bits_for(self, out_channels, row_length):
        """``storage_bits`` from output channels and row length (ints or numpy arrays)."""
        return _runtimes().runtime_of(self).storage_bits_for(self, out_channels, row_length)

    def effective_bits(self, shape: tuple[int, ...]) -> float:
        """Bits per weight including scale and zero-point overhead."""
        return self.storage_bits(shape) / math.prod(shape)


@lru_cache(maxsize=256)
def parse_option(name: str) -> Option:
    """Parse an option name with the registered runtimes' grammars. Raises InvalidOptionError naming them."""
    if not isinstance(name, str):
        raise InvalidOptionError(f"option {name!r} is not a string", "pass option names such as 'int4'")
    return _runtimes().parse(name)


def parse_options(names) -> list[Option]:
    """Parse a non-empty sequence of unique option names."""
    names = list(names)
    if not names:
        raise InvalidOptionError("no options given", "pass at least one option, e.g. ['int4', 'int8']")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidOptionError(f"duplicate options {dup}", "list each option once")
    return [parse_option(n) for n in names]


# 2 to 8 bits in small steps: group-wise and asymmetric formats give real choices between 3 and 4 bits
# (effective bits with fp16 scales: 2.28, 3.15, 3.30, 3.59, 4.13, 4.25, 4.63, 5.25, 6.13, ~8.02)
DEFAULT_OPTIONS = (
    "int2_g64_asym",
    "int3_g128_asym",
    "int3_g64_asym",
    "int3_g32_asym",
    "int4_g128",
    "int4_g64",
    "int4_g32_asym",
    "int5_g64",
    "int6_g128",
    "int8",
)
