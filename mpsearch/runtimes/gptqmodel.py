"""GPTQModel: ``gptq:int{b}[_g{G}][_asym]`` (b in 2, 3, 4, 8) on GPTQ's own grid (the ``Quantizer.find_params``
of GPTQ's reference code, per group, min-max: levels 0 .. 2^b - 1, zero point (2^b)/2 when symmetric, else
round(-min / scale)); stored as packed b-bit weights, fp16 scales, packed b-bit zeros per group and an int32
``g_idx`` per input channel, so values decode with the fp16 scale. Written: ``QuantizeConfig(dynamic=...)``,
``+:<regex>`` -> {bits, group_size, sym} per layer. The whole runtime is this module (and its registration)."""

from __future__ import annotations

import json
import re

from mpsearch.runtimes.base import SCALE_BITS, Runtime, UniformGrid

_RE = re.compile(r"^gptq:int(?P<bits>[1-8])(?:_g(?P<group>[1-9][0-9]*))?(?P<asym>_asym)?$")
BITS = (2, 3, 4, 8)


def grid(x, option):
    """(scale, zero point) of each group: x is (..., group size), results keep a last dim of 1."""
    import torch

    maxq = 2**option.bits - 1
    xmin = x.amin(-1, keepdim=True).clamp(max=0)
    xmax = x.amax(-1, keepdim=True).clamp(min=0)
    if option.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if option.symmetric else torch.round(-xmin / scale)
    return scale, zero


def dequantized(x, scale, zero, option):
    """x rounded to the nearest level of the grid, decoded with the fp16 scale GPTQModel stores."""
    import torch

    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**option.bits - 1)
    return scale.half().float() * (q - zero)


class GPTQGrid(UniformGrid):
    """GPTQ's column loop on this grid: rounds with the float32 scale, decodes with the fp16 one."""

    def __init__(self, option) -> None:
        self.option, self.lo, self.hi = option, 0, 2**option.bits - 1

    def fit(self, cols):
        scale, zero = grid(cols, self.option)
        return scale[:, 0], zero[:, 0], scale[:, 0].half().float()


def gptqmodel_dynamic(plan) -> dict:
    from mpsearch.core.options import parse_option

    out = {}
    for layer, name in plan.items():
        o = parse_option(name)
        out[f"+:^{re.escape(layer)}$"] = {"bits": o.bits, "group_size": o.group_size or -1, "sym": o.symmetric}
    return out


class GPTQModel(Runtime):
    name = "gptqmodel"
    family = "gptq"
    prefix = "gptq:"
    default_options = tuple(
        "gptq:" + o for o in ("int2_g32", "int3_g32", "int3_g128", "int4_g32", "int4_g128", "int8_g128")
    )
    accepted = "gptq:int<2|3|4|8>[_g<group>][_asym]"

    def parse(self, name: str):
        from mpsearch.core.options import Option, bits_error

        m = _RE.match(name)
        if m is None:
            return None
        if int(m["bits"]) not in BITS:
            raise bits_error(name, "gptq", int(m["bits"]), BITS)
        group = int(m["group"]) if m["group"] else None
        return Option(name, "int", int(m["bits"]), not m["asym"], group, runtime=self.family)

    def storage_bits_for(self, option, out_channels, row_length):
        scales = self.scales_for(option, out_channels, row_length)
        values = out_channels * row_length * option.bits
        return values + scales * (SCALE_BITS + option.bits) + row_length * 32  # + int32 g_idx per input

    def fake_quantize(self, w, option):
        rows = w.detach().reshape(w.shape[0], -1).float()
        x = rows.reshape(rows.shape[0], -1, option.group_size or rows.shape[1])
        return dequantized(x, *grid(x, option), option).reshape(w.shape).to(w.dtype)

    def gptq_grid(self, option):
        return GPTQGrid(option)

    def reference(self, w, option):
        """GPTQModel builds CUDA kernels and does not install here: its tensors' layout is counted instead
        (int32 ``qweight`` of 32 / b values a word, ``qzeros`` likewise, fp16 ``scales``, int32 ``g_idx``)."""
        out, inp = w.shape[0], w[0].numel()
        groups = inp // (option.group_size or inp)
        words = inp * option.bits // 32 * out + groups * (out * option.bits // 32)
        return (32 * words + 16 * groups * out + 32 * inp) // 8, None

    def render(self, plan, **kwargs) -> str:
        return json.dumps(gptqmodel_dynamic(plan), indent=2)
