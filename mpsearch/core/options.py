"""Quantization options: a small grammar of names -> :class:`Option`.

Grammar (case-sensitive):

- ``int{b}``            symmetric integer, b in 2..8, one scale per output channel
- ``int{b}_asym``       asymmetric (scale + zero point) per output channel
- ``int{b}_g{G}``       symmetric, one scale per group of G input elements (e.g. ``int4_g128``)
- ``int{b}_g{G}_asym``  asymmetric group-wise
- ``fp8_e4m3``, ``fp8_e5m2``   FP8 with one scale per output channel
- ``fp4_e2m1``          FP4 with one scale per group of 32 (``fp4_e2m1_g{G}`` for other groups)
- ``fp16``              no quantization beyond a cast to half precision

Scales are stored as fp16 (16 bits) and zero points with ``b`` bits; both count in the effective bits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from mpsearch.core.errors import InvalidOptionError

SCALE_BITS = 16
FP4_DEFAULT_GROUP = 32
_FP_FORMATS = {"fp8_e4m3": (8, 4, 3), "fp8_e5m2": (8, 5, 2), "fp4_e2m1": (4, 2, 1)}
_INT_RE = re.compile(r"^int(?P<bits>[2-8])(?:_g(?P<group>[1-9][0-9]*))?(?P<asym>_asym)?$")
_FP_RE = re.compile(r"^(?P<fmt>fp8_e4m3|fp8_e5m2|fp4_e2m1)(?:_g(?P<group>[1-9][0-9]*))?$")


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

    def n_scales(self, shape: tuple[int, ...]) -> int:
        """Number of scales stored for a weight of this shape (dim 0 = output channels)."""
        return int(self.scales_for(shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1))

    def scales_for(self, out_channels, row_length):
        """``n_scales`` from output channels and row length (ints, or numpy arrays for many layers)."""
        if self.kind == "none":
            return out_channels * 0
        if self.group_size is None:
            return out_channels
        return out_channels * (-(-row_length // self.group_size))  # ceil division, also on arrays

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Total bits to store a weight of ``shape``: elements + scales + zero points."""
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        return int(self.storage_bits_for(shape[0], row))

    def storage_bits_for(self, out_channels, row_length):
        """``storage_bits`` from output channels and row length (ints or numpy arrays)."""
        zero_bits = 0 if self.symmetric else self.bits
        scales = self.scales_for(out_channels, row_length)
        return out_channels * row_length * self.bits + scales * (SCALE_BITS + zero_bits)

    def effective_bits(self, shape: tuple[int, ...]) -> float:
        """Bits per weight including scale and zero-point overhead."""
        return self.storage_bits(shape) / math.prod(shape)


@lru_cache(maxsize=256)
def parse_option(name: str) -> Option:
    """Parse an option name (see module docstring). Raises InvalidOptionError with the grammar."""
    if not isinstance(name, str):
        raise InvalidOptionError(f"option {name!r} is not a string", "pass option names such as 'int4'")
    if name == "fp16":
        return Option(name=name, kind="none", bits=16)
    m = _INT_RE.match(name)
    if m:
        group = int(m["group"]) if m["group"] else None
        return Option(name=name, kind="int", bits=int(m["bits"]), symmetric=not m["asym"], group_size=group)
    m = _FP_RE.match(name)
    if m:
        bits, e, mant = _FP_FORMATS[m["fmt"]]
        group = int(m["group"]) if m["group"] else (FP4_DEFAULT_GROUP if bits == 4 else None)
        return Option(name=name, kind="fp", bits=bits, group_size=group, exponent_bits=e, mantissa_bits=mant)
    raise InvalidOptionError(
        f"unknown option {name!r}",
        "use int2..int8 with optional _g<group> and _asym (e.g. int4_g128_asym), fp8_e4m3, fp8_e5m2, "
        "fp4_e2m1[_g<group>] or fp16",
    )


def parse_options(names) -> list[Option]:
    """Parse a non-empty sequence of unique option names."""
    names = list(names)
    if not names:
        raise InvalidOptionError("no options given", "pass at least one option, e.g. ['int4', 'int8']")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidOptionError(f"duplicate options {dup}", "list each option once")
    return [parse_option(n) for n in names]


DEFAULT_OPTIONS = ("int3", "int4", "int5", "int6", "int8")
