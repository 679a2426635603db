"""HQQ: ``hqq:int{b}_g{G}`` (b in 1, 2, 3, 4, 8; always asymmetric with a float zero): b-bit weights (3-bit:
10 values per int32, about 3.2 bits), fp16 scale and fp16 zero per group; math: HQQ's own optimizer
(``mpsearch.quant.hqq_quant``). Written: ``HqqConfig(dynamic_config=...)``, keyed by linear tags (the name
after the block index, e.g. ``self_attn.q_proj``), so every layer sharing a tag is tied to one option."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from mpsearch.core.errors import InvalidOptionError, MpsearchError
from mpsearch.runtimes.base import SCALE_BITS, Runtime

_RE = re.compile(r"^hqq:int(?P<bits>[1-8])(?:_g(?P<group>[1-9][0-9]*))?(?P<asym>_asym)?$")
BITS = (1, 2, 3, 4, 8)


def hqq_tag(layer: str) -> str:
    """HQQ's tag of a layer: its name after the block index (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``)."""
    return re.sub(r"^.*?\.\d+\.", "", layer)


def hqq_dynamic_config(plan) -> dict:
    from mpsearch.core.options import parse_option

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


class HQQ(Runtime):
    name = "hqq"
    family = "hqq"
    prefix = "hqq:"
    writer = "mpsearch.artifacts.saved:write_hqq"
    default_options = tuple(
        "hqq:" + o for o in ("int2_g32", "int2_g64", "int3_g64", "int4_g64", "int4_g128", "int8_g64")
    )
    accepted = "hqq:int<1|2|3|4|8>_g<group>"

    def parse(self, name: str):
        from mpsearch.core.options import Option, bits_error

        m = _RE.match(name)
        if m is None:
            return None
        if int(m["bits"]) not in BITS:
            raise bits_error(name, "hqq", int(m["bits"]), BITS)
        if m["group"] is None or m["asym"]:
            raise InvalidOptionError(
                f"option {name!r}: HQQ is group-wise and always asymmetric",
                "write hqq:int<b>_g<group>, e.g. hqq:int4_g64",
            )
        return Option(name, "int", int(m["bits"]), False, int(m["group"]), runtime=self.family)

    def storage_bits_for(self, option, out_channels, row_length):
        scales = self.scales_for(option, out_channels, row_length)
        values = out_channels * row_length * option.bits
        if option.bits == 3:  # 10 groups' values per int32 row
            values = -(-scales // 10) * option.group_size * 32
        return values + scales * 2 * SCALE_BITS  # fp16 scale and fp16 zero per group

    def fake_quantize(self, w, option):
        from mpsearch.quant.hqq_quant import fake_quantize

        return fake_quantize(w, option)

    def reference(self, w, option):
        """HQQ's own ``HQQLinear`` of the weight: the bytes of W_q, scale and zero, and its ``dequantize()``."""
        import copy

        import torch
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
        lin.weight.copy_(w.detach().float())
        config = BaseQuantizeConfig(nbits=option.bits, group_size=option.group_size)
        layer = HQQLinear(copy.deepcopy(lin), config, compute_dtype=torch.float16, device="cpu")
        stored = (layer.W_q, layer.meta["scale"], layer.meta["zero"])
        return sum(t.numel() * t.element_size() for t in stored), layer.dequantize().float()

    def ties(self, layers: Iterable[str]) -> list[tuple[str, ...]]:
        """HQQ takes one config per tag, so the layers of a tag share an option."""
        groups: dict[str, list[str]] = {}
        for layer in layers:
            groups.setdefault(hqq_tag(layer), []).append(layer)
        return [tuple(g) for g in groups.values() if len(g) > 1]

    def render(self, plan, **kwargs) -> str:
        return json.dumps(hqq_dynamic_config(plan), indent=2)
