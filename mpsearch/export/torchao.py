"""torchao: a ``FqnToConfig`` of ``IntxWeightOnlyConfig`` per layer (int1..int8, per channel or group-wise,
symmetric or asymmetric), the configs whose math ``torchao:`` options reproduce."""

from __future__ import annotations

import json

from mpsearch.core import BitPlan, parse_option
from mpsearch.export.base import Target
from mpsearch.quant.torchao_affine import require_torchao


def torchao_config(plan: BitPlan):
    require_torchao()
    import torch
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    configs = {}
    for layer, name in plan.items():
        opt = parse_option(name)
        configs[layer] = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{opt.bits}"),
            granularity=PerGroup(opt.group_size) if opt.group_size else PerAxis(0),
            mapping_type=MappingType.SYMMETRIC if opt.symmetric else MappingType.ASYMMETRIC,
        )
    return FqnToConfig(configs)


class Torchao(Target):
    name = "torchao"
    runtime = "torchao"
    prefix = "torchao:"
    default_options = tuple(
        "torchao:" + o
        for o in ("int2_g32_asym", "int3_g32_asym", "int4_g32", "int4_g32_asym", "int5_g32", "int6_g32", "int8")
    )
    accepted = "torchao:int<1-8>[_g<group>][_asym]"

    def render(self, plan: BitPlan) -> str:
        """JSON of the FqnToConfig (torchao.core.config.config_to_dict); load with config_from_dict."""
        from torchao.core.config import config_to_dict

        return json.dumps(config_to_dict(torchao_config(plan)), indent=2)
