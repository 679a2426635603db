"""HQQ: ``HqqConfig(dynamic_config=...)``, keyed by linear tags (the name after the block index, e.g.
``self_attn.q_proj``): every layer sharing a tag must share an option."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from mpsearch.core import BitPlan, MpsearchError, parse_option
from mpsearch.export.base import Target


def hqq_tag(layer: str) -> str:
    """HQQ's tag of a layer: its name after the block index (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``)."""
    return re.sub(r"^.*?\.\d+\.", "", layer)


def hqq_dynamic_config(plan: BitPlan) -> dict:
    out: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for layer, name in plan.items():
        o = parse_option(name)
        tag = hqq_tag(layer)
        cfg = {"nbits": o.bits, "group_size": o.group_size}
        if tag in out and out[tag] != cfg:
            raise MpsearchError(
                f"layer {layer!r} gets {plan[layer]!r} but {seen[tag]!r} with the same HQQ tag {tag!r} gets "
                f"{plan[seen[tag]]!r}",
                "HQQ configures by tag: search with --target hqq (target='hqq'), which ties the layers of a tag",
            )
        out.setdefault(tag, cfg)
        seen.setdefault(tag, layer)
    return out


class HQQ(Target):
    name = "hqq"
    runtime = "hqq"
    prefix = "hqq:"
    default_options = tuple(
        "hqq:" + o for o in ("int2_g32", "int2_g64", "int3_g64", "int4_g64", "int4_g128", "int8_g64")
    )
    accepted = "hqq:int<1|2|3|4|8>_g<group>"

    def ties(self, layers: Iterable[str]) -> list[tuple[str, ...]]:
        """HQQ takes one config per tag, so the layers of a tag share an option."""
        groups: dict[str, list[str]] = {}
        for layer in layers:
            groups.setdefault(hqq_tag(layer), []).append(layer)
        return [tuple(g) for g in groups.values() if len(g) > 1]

    def render(self, plan: BitPlan) -> str:
        return json.dumps(hqq_dynamic_config(plan), indent=2)
