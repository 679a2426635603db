"""mpsearch's own formats: ``int{b}[_g{G}][_asym]`` (b in 2..8), ``fp8_e4m3``, ``fp8_e5m2``,
``fp4_e2m1[_g{G}]`` and ``fp16``; fp16 scales, b-bit zero points, the last group zero-padded (so any row
length fits). Math: ``mpsearch.quant.formats.native_quantize``; GPTQ uses the int grids. Written: the plan
JSON (``mpsearch.apply_plan`` / ``quantized`` read it)."""

from __future__ import annotations

import re

from mpsearch.core.options import DEFAULT_OPTIONS
from mpsearch.runtimes.base import SCALE_BITS, Runtime, UniformGrid

FP4_DEFAULT_GROUP = 32
_FP_FORMATS = {"fp8_e4m3": (8, 4, 3), "fp8_e5m2": (8, 5, 2), "fp4_e2m1": (4, 2, 1)}
_INT_RE = re.compile(r"^int(?P<bits>[2-8])(?:_g(?P<group>[1-9][0-9]*))?(?P<asym>_asym)?$")
_FP_RE = re.compile(r"^(?P<fmt>fp8_e4m3|fp8_e5m2|fp4_e2m1)(?:_g(?P<group>[1-9][0-9]*))?$")


class IntGrid(UniformGrid):
    """mpsearch's integer grid as GPTQ's column loop uses it: ``fit(cols)`` -> (scale, zero, decode scale) per
    row with fp16 scales; a column x is stored as q = clamp(round(x / scale) + zero, lo, hi)."""

    def __init__(self, option) -> None:
        self.option = option
        b = option.bits
        self.lo, self.hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if option.symmetric else (0, 2**b - 1)

    def fit(self, cols):
        from mpsearch.quant.formats import int_grid

        scale, zero = int_grid(cols, self.option)
        return scale[:, 0], zero[:, 0], scale[:, 0]


class Native(Runtime):
    """mpsearch's own formats (``mpsearch.quantize``/``apply_plan``): the plan JSON."""

    name = "mpsearch"
    family = "mpsearch"
    default_options = DEFAULT_OPTIONS
    accepted = "int<2-8>[_g<group>][_asym], fp8_e4m3, fp8_e5m2, fp4_e2m1[_g<group>], fp16"

    def parse(self, name: str):
        from mpsearch.core.options import Option

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
        return None

    def scales_for(self, option, out_channels, row_length):
        return out_channels * 0 if option.kind == "none" else super().scales_for(option, out_channels, row_length)

    def storage_unit(self, option) -> int | None:
        return None  # the last group is zero-padded: any row fits

    def storage_bits_for(self, option, out_channels, row_length):
        zero_bits = 0 if option.symmetric else option.bits
        scales = self.scales_for(option, out_channels, row_length)
        return out_channels * row_length * option.bits + scales * (SCALE_BITS + zero_bits)

    def fake_quantize(self, w, option):
        from mpsearch.quant.formats import native_quantize

        return native_quantize(w, option)

    def quantize(self, w, option):
        return self.fake_quantize(w, option)  # pads its own last group

    def gptq_grid(self, option):
        return IntGrid(option) if option.kind == "int" else None

    def render(self, plan, **kwargs) -> str:
        return plan.to_json()


class PlanJson(Native):
    """The plan JSON, whatever its options (a writer only)."""

    name = "json"
    writer_only = True

    def accepts(self, option) -> bool:
        return True
