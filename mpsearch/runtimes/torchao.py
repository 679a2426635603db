"""torchao: ``torchao:int{b}[_g{G}][_asym]`` (b in 1..8), torchao's affine qparams (``choose_qparams_affine``,
int range [-2^(b-1), 2^(b-1)-1]; math: ``mpsearch.quant.torchao_affine``), stored as ``IntxWeightOnlyConfig``
stores them (its default ``unpacked_to_int8`` layout): an int8 per weight whatever b, a scale in the model's
dtype (charged as bf16/fp16: 16 bits) and an int8 zero point per group. Fewer bits change quality, not size,
until a kernel packs them. Written: a ``FqnToConfig`` of ``IntxWeightOnlyConfig`` per layer (JSON)."""

from __future__ import annotations

import json
import re

from mpsearch.runtimes.base import SCALE_BITS, Runtime

_RE = re.compile(r"^torchao:int(?P<bits>[1-8])(?:_g(?P<group>[1-9][0-9]*))?(?P<asym>_asym)?$")


def torchao_config(plan):
    from mpsearch.quant.torchao_affine import require_torchao

    require_torchao()
    import torch
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    from mpsearch.core.options import parse_option

    configs = {}
    for layer, name in plan.items():
        opt = parse_option(name)
        configs[layer] = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{opt.bits}"),
            granularity=PerGroup(opt.group_size) if opt.group_size else PerAxis(0),
            mapping_type=MappingType.SYMMETRIC if opt.symmetric else MappingType.ASYMMETRIC,
        )
    return FqnToConfig(configs)


class Torchao(Runtime):
    name = "torchao"
    family = "torchao"
    prefix = "torchao:"
    writer = "mpsearch.artifacts.saved:write_torchao"
    default_options = tuple(
        "torchao:" + o
        for o in ("int2_g32_asym", "int3_g32_asym", "int4_g32", "int4_g32_asym", "int5_g32", "int6_g32", "int8")
    )
    accepted = "torchao:int<1-8>[_g<group>][_asym]"

    def parse(self, name: str):
        from mpsearch.core.options import Option

        m = _RE.match(name)
        if m is None:
            return None
        group = int(m["group"]) if m["group"] else None
        return Option(name, "int", int(m["bits"]), not m["asym"], group, runtime=self.family)

    def storage_bits_for(self, option, out_channels, row_length):
        scales = self.scales_for(option, out_channels, row_length)
        return out_channels * row_length * 8 + scales * (SCALE_BITS + 8)  # int8 per value, bf16 scale, int8 zero

    def fake_quantize(self, w, option):
        from mpsearch.quant.torchao_affine import fake_quantize

        return fake_quantize(w, option)

    def reference(self, w, option):
        """torchao's own ``quantize_`` of a bf16 Linear (its models run in bf16): the bytes of the tensors it
        keeps (qdata, scale, zero_point) and its ``dequantize()``."""
        import torch
        from torchao.quantization import quantize_

        from mpsearch.core import BitPlan

        w = w.detach().bfloat16()
        model = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16))
        model[0].weight.data.copy_(w)
        quantize_(model, torchao_config(BitPlan({"0": option.name})), filter_fn=None)
        q = model[0].weight
        return sum(t.numel() * t.element_size() for t in (q.qdata, q.scale, q.zero_point)), q.dequantize()

    def render(self, plan, **kwargs) -> str:
        """JSON of the FqnToConfig (torchao.core.config.config_to_dict); load with config_from_dict."""
        config = torchao_config(plan)  # first: says which package to install when torchao is missing
        from torchao.core.config import config_to_dict

        return json.dumps(config_to_dict(config), indent=2)
