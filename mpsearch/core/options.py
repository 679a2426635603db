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

Runtime families (the targets of ``mpsearch.export.TARGETS``): the options a runtime stores, with its own
sizes and math.

- llama.cpp GGUF types by their llama.cpp names: ``q8_0 q6_k q5_k q5_1 q5_0 q4_k q4_1 q4_0 q3_k q2_k``:
  blocks of 32 (``q*_0``/``q*_1``) or 256 (``q*_k``) weights along the row, each block stored in a fixed
  number of bytes (every scale, min and super-block field included); a layer whose rows are not a multiple
  of the block size cannot take the type.
- ``torchao:int{b}[_g{G}][_asym]``   torchao's affine qparams (``choose_qparams_affine``, int range
  [-2^(b-1), 2^(b-1)-1]); stored as ``IntxWeightOnlyConfig`` stores them (its default ``unpacked_to_int8``
  layout): an int8 per weight whatever b, a scale in the model's dtype (charged as bf16/fp16: 16 bits) and
  an int8 zero point per group. Fewer bits change quality, not size, until a kernel packs them.
- ``gptq:int{b}[_g{G}][_asym]``      GPTQModel (b in 2, 3, 4, 8): GPTQ's grid; packed b-bit weights, fp16
  scales and packed b-bit zeros per group, and the int32 ``g_idx`` per input channel
- ``hqq:int{b}_g{G}``                HQQ (b in 1, 2, 3, 4, 8; asymmetric, float zero): b-bit weights
  (3-bit: 10 values per int32, about 3.2 bits), fp16 scale and fp16 zero per group
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
_RUNTIME_RE = re.compile(
    r"^(?P<runtime>torchao|gptq|hqq):int(?P<bits>[1-8])(?:_g(?P<group>[1-9][0-9]*))?(?P<asym>_asym)?$"
)
# GGUF type -> (nominal bits, weights per block, bytes per block): ggml's block structs (gguf.GGML_QUANT_SIZES)
GGUF_TYPES = {
    "q8_0": (8, 32, 34),
    "q6_k": (6, 256, 210),
    "q5_k": (5, 256, 176),
    "q5_1": (5, 32, 24),
    "q5_0": (5, 32, 22),
    "q4_k": (4, 256, 144),
    "q4_1": (4, 32, 20),
    "q4_0": (4, 32, 18),
    "q3_k": (3, 256, 110),
    "q2_k": (2, 256, 84),
}
RUNTIME_BITS = {"torchao": (1, 2, 3, 4, 5, 6, 7, 8), "gptq": (2, 3, 4, 8), "hqq": (1, 2, 3, 4, 8)}
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
    runtime: str = "mpsearch"  # whose storage and quantization math: mpsearch, llama.cpp, torchao, gptq, hqq
    block_size: int = 0  # GGUF types: weights per block along a row
    block_bytes: int = 0  # GGUF types: bytes per block

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the runtime can store a weight of this shape (see ``fits_row``)."""
        return bool(self.fits_row(math.prod(shape[1:]) if len(shape) > 1 else 1))

    def fits_row(self, row_length):
        """Whether rows of this length (an int or a numpy array) can be stored: a GGUF row must be whole
        blocks, a runtime's group-wise row whole groups (mpsearch's own formats pad the last group)."""
        unit = self.block_size if self.kind == "gguf" else self.group_size if self.runtime != "mpsearch" else None
        return row_length % unit == 0 if unit else row_length == row_length

    def n_scales(self, shape: tuple[int, ...]) -> int:
        """Number of scales stored for a weight of this shape (dim 0 = output channels)."""
        return int(self.scales_for(shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1))

    def scales_for(self, out_channels, row_length):
        """``n_scales`` from output channels and row length (ints, or numpy arrays for many layers)."""
        if self.kind in ("none", "gguf"):
            return out_channels * 0  # GGUF scales live inside the blocks: storage_bits_for counts them
        if self.group_size is None:
            return out_channels
        return out_channels * (-(-row_length // self.group_size))  # ceil division, also on arrays

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Total bits to store a weight of ``shape``: elements + scales + zero points."""
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        return int(self.storage_bits_for(shape[0], row))

    def storage_bits_for(self, out_channels, row_length):
        """``storage_bits`` from output channels and row length (ints or numpy arrays)."""
        if self.kind == "gguf":
            return out_channels * (-(-row_length // self.block_size)) * self.block_bytes * 8
        scales = self.scales_for(out_channels, row_length)
        values = out_channels * row_length * self.bits
        if self.runtime == "torchao":  # IntxWeightOnlyConfig's layout: int8 per value, bf16 scale, int8 zero
            return out_channels * row_length * 8 + scales * (SCALE_BITS + 8)
        if self.runtime == "gptq":  # fp16 scale + packed zero per group, int32 g_idx per input channel
            return values + scales * (SCALE_BITS + self.bits) + row_length * 32
        if self.runtime == "hqq":  # fp16 scale and fp16 zero per group; 3-bit: 10 groups' values per int32 row
            if self.bits == 3:
                values = -(-scales // 10) * self.group_size * 32
            return values + scales * 2 * SCALE_BITS
        zero_bits = 0 if self.symmetric else self.bits
        return values + scales * (SCALE_BITS + zero_bits)

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
    if name in GGUF_TYPES:
        bits, block, nbytes = GGUF_TYPES[name]
        asym = name.endswith(("_1", "_k")) and name not in ("q6_k", "q3_k")  # types that store a min
        return Option(name, "gguf", bits, not asym, None, runtime="llama.cpp", block_size=block, block_bytes=nbytes)
    m = _RUNTIME_RE.match(name)
    if m:
        return _runtime_option(name, m)
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
        f"fp4_e2m1[_g<group>], fp16, a llama.cpp type ({', '.join(GGUF_TYPES)}) or "
        "torchao:/gptq:/hqq: followed by int<b>[_g<group>][_asym]",
    )


def _runtime_option(name: str, m: re.Match) -> Option:
    runtime, bits = m["runtime"], int(m["bits"])
    group = int(m["group"]) if m["group"] else None
    if bits not in RUNTIME_BITS[runtime]:
        raise InvalidOptionError(
            f"option {name!r}: {runtime} has no {bits}-bit weights", f"use bits in {RUNTIME_BITS[runtime]}"
        )
    if runtime == "hqq":
        if group is None or m["asym"]:
            raise InvalidOptionError(
                f"option {name!r}: HQQ is group-wise and always asymmetric",
                "write hqq:int<b>_g<group>, e.g. hqq:int4_g64",
            )
        return Option(name, "int", bits, False, group, runtime=runtime)
    return Option(name, "int", bits, not m["asym"], group, runtime=runtime)


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
