"""GPTQModel: ``QuantizeConfig(dynamic=...)``, ``+:<regex>`` -> {bits, group_size, sym} per layer."""

from __future__ import annotations

import json
import re

from mpsearch.core import BitPlan, parse_option
from mpsearch.export.base import Target


def gptqmodel_dynamic(plan: BitPlan) -> dict:
    out = {}
    for layer, name in plan.items():
        o = parse_option(name)
        out[f"+:^{re.escape(layer)}$"] = {"bits": o.bits, "group_size": o.group_size or -1, "sym": o.symmetric}
    return out


class GPTQModel(Target):
    name = "gptqmodel"
    runtime = "gptq"
    prefix = "gptq:"
    default_options = tuple(
        "gptq:" + o for o in ("int2_g32", "int3_g32", "int3_g128", "int4_g32", "int4_g128", "int8_g128")
    )
    accepted = "gptq:int<2|3|4|8>[_g<group>][_asym]"

    def render(self, plan: BitPlan) -> str:
        return json.dumps(gptqmodel_dynamic(plan), indent=2)
