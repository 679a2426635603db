"""Exporters: hand a BitPlan to real quantization runtimes.

Each exporter validates the plan against what its runtime supports and names the first layer that breaks
it. ``export(plan, fmt)`` returns the file's text; ``FORMATS`` lists the formats.
"""

from __future__ import annotations

import json
import re

from mpsearch.core import BitPlan, MpsearchError, Option, parse_option


def _unsupported(layer: str, option: str, runtime: str, supported: str) -> MpsearchError:
    return MpsearchError(
        f"layer {layer!r} has option {option!r}, which {runtime} has no type for",
        f"search with options {runtime} supports ({supported})",
    )


def _fqn_regex(layer: str) -> str:
    return "^" + re.escape(layer) + "$"


# ---------------------------------------------------------------- torchao
def torchao_config(plan: BitPlan):
    """A torchao ``FqnToConfig``: IntxWeightOnlyConfig per layer (int2..int8, per-channel or group-wise,
    symmetric or asymmetric); FP formats and fp16 are refused."""
    import torch
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    configs = {}
    for layer, name in plan.items():
        opt = parse_option(name)
        if opt.kind != "int":
            raise _unsupported(layer, name, "torchao IntxWeightOnlyConfig", "int2..int8, _g<group>, _asym")
        configs[layer] = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{opt.bits}"),
            granularity=PerGroup(opt.group_size) if opt.group_size else PerAxis(0),
            mapping_type=MappingType.SYMMETRIC if opt.symmetric else MappingType.ASYMMETRIC,
        )
    return FqnToConfig(configs)


def to_torchao(plan: BitPlan) -> str:
    """JSON of the FqnToConfig (torchao.core.config.config_to_dict); load with config_from_dict."""
    from torchao.core.config import config_to_dict

    return json.dumps(config_to_dict(torchao_config(plan)), indent=2)


# ---------------------------------------------------------------- llama.cpp
_GGUF_TYPES = {  # nearest GGUF type for each option (llama.cpp quantizes in blocks of 32 or 256)
    "int2": "q2_k",
    "int3": "q3_k",
    "int4": "q4_k",
    "int5": "q5_k",
    "int6": "q6_k",
    "int8": "q8_0",
    "int4_g32": "q4_0",
    "int4_g32_asym": "q4_1",
    "int5_g32": "q5_0",
    "int5_g32_asym": "q5_1",
    "int8_g32": "q8_0",
    "fp16": "f16",
}


def gguf_name(layer: str, arch: str = "llama") -> str:
    """GGUF tensor name of a Hugging Face module, from the ``gguf`` package's own name map (the one
    llama.cpp's converter uses)."""
    import gguf

    try:
        model_arch = gguf.MODEL_ARCH[arch.upper()]
    except KeyError:
        raise MpsearchError(
            f"unknown GGUF architecture {arch!r}", "use a gguf.MODEL_ARCH name, e.g. llama or bert"
        ) from None
    blocks = [int(n) for n in re.findall(r"\.(\d+)\.", "." + layer + ".")] or [0]
    name = gguf.get_tensor_name_map(model_arch, max(blocks) + 1).get_name(layer + ".weight", try_suffixes=(".weight",))
    if name is None:
        raise MpsearchError(
            f"layer {layer!r} has no GGUF tensor name for architecture {arch!r}", "pass the model's arch"
        )
    return name


def to_llama_cpp(plan: BitPlan, arch: str = "llama") -> str:
    """``--tensor-type-file`` for llama-quantize: one ``pattern=type`` line per tensor."""
    lines = []
    for layer, name in plan.items():
        if name not in _GGUF_TYPES:
            raise _unsupported(layer, name, "llama.cpp", ", ".join(sorted(_GGUF_TYPES)))
        lines.append(f"^{re.escape(gguf_name(layer, arch))}$={_GGUF_TYPES[name]}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- GPTQModel
def _gptq_like(plan: BitPlan, runtime: str, bits_ok: set[int]) -> dict[str, Option]:
    out = {}
    for layer, name in plan.items():
        opt = parse_option(name)
        if opt.kind != "int" or opt.bits not in bits_ok:
            raise _unsupported(
                layer, name, runtime, f"int{{{','.join(map(str, sorted(bits_ok)))}}} with optional _g<group>"
            )
        out[layer] = opt
    return out


def gptqmodel_dynamic(plan: BitPlan) -> dict:
    """GPTQModel ``QuantizeConfig(dynamic=...)``: ``+:<regex>`` -> {bits, group_size, sym} per layer."""
    opts = _gptq_like(plan, "GPTQModel", {2, 3, 4, 8})
    return {
        f"+:{_fqn_regex(layer)}": {"bits": o.bits, "group_size": o.group_size or -1, "sym": o.symmetric}
        for layer, o in opts.items()
    }


# ---------------------------------------------------------------- HQQ
def hqq_dynamic_config(plan: BitPlan) -> dict:
    """HQQ ``HqqConfig(dynamic_config=...)``: keys are linear tags (the name after the block index, e.g.
    ``attention.self.query``), so every layer sharing a tag must share an option; HQQ is group-wise."""
    opts = _gptq_like(plan, "HQQ", {1, 2, 3, 4, 8})
    out: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for layer, o in opts.items():
        tag = re.sub(r"^.*?\.\d+\.", "", layer)
        cfg = {"nbits": o.bits, "group_size": o.group_size or 64}
        if tag in out and out[tag] != cfg:
            raise MpsearchError(
                f"layer {layer!r} gets {plan[layer]!r} but {seen[tag]!r} with the same HQQ tag {tag!r} gets "
                f"{plan[seen[tag]]!r}",
                "HQQ configures by tag: tie layers with the same tag (Budget(ties=...)) before searching",
            )
        out.setdefault(tag, cfg)
        seen.setdefault(tag, layer)
    return out


FORMATS = {
    "torchao": to_torchao,
    "llama.cpp": to_llama_cpp,
    "gptqmodel": lambda plan: json.dumps(gptqmodel_dynamic(plan), indent=2),
    "hqq": lambda plan: json.dumps(hqq_dynamic_config(plan), indent=2),
    "json": lambda plan: plan.to_json(),
}


def export(plan: BitPlan, fmt: str) -> str:
    if fmt not in FORMATS:
        raise MpsearchError(f"unknown export format {fmt!r}", f"use one of {sorted(FORMATS)}")
    return FORMATS[fmt](plan)
