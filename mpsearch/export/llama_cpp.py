"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize`` (one ``^name$=type`` line per GGUF tensor), and
the GGUF tensor names and sizes by llama.cpp's own rules."""

from __future__ import annotations

import math
import re

from mpsearch.core import BitPlan, MpsearchError
from mpsearch.core.options import GGUF_TYPES
from mpsearch.export.base import Target

# transformers ``config.model_type`` -> gguf.MODEL_ARCH name (the converter's tensor name map)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "bert": "bert"}


def gguf_name(layer: str, arch: str = "llama") -> str:
    """GGUF tensor name of a Hugging Face module, from the ``gguf`` package's own name map (the one
    llama.cpp's converter uses). BertModel's names lack the ``bert.`` prefix the map expects: tried both."""
    import gguf

    key = ARCHITECTURES.get(arch, arch)
    try:
        model_arch = gguf.MODEL_ARCH[key.upper()]
    except KeyError:
        raise MpsearchError(
            f"unknown GGUF architecture {arch!r}", f"use one of {sorted(ARCHITECTURES)} or a gguf.MODEL_ARCH name"
        ) from None
    blocks = [int(n) for n in re.findall(r"\.(\d+)\.", "." + layer + ".")] or [0]
    names = gguf.get_tensor_name_map(model_arch, max(blocks) + 1)
    for candidate in (layer, f"{key}.{layer}"):
        name = names.get_name(candidate + ".weight", try_suffixes=(".weight",))
        if name is not None:
            return name
    raise MpsearchError(
        f"layer {layer!r} has no GGUF tensor for architecture {arch!r}",
        "export a plan made for a model of this architecture, or pass its --arch",
    )


def tensors_of(plan: BitPlan, arch: str = "llama") -> dict[str, str]:
    """Plan layer -> the GGUF tensor llama.cpp stores it as. A tied layer (plan provenance ``aliases``, e.g.
    ``lm_head`` sharing ``model.embed_tokens``) is the embedding's tensor (``token_embd.weight``; a tied GGUF
    has no ``output.weight``)."""
    aliases = plan.provenance.get("aliases") or {}
    out = {}
    for layer in plan.assignments:
        tensors = [gguf_name(n, arch) for n in (layer, *aliases.get(layer, []))]
        out[layer] = "token_embd.weight" if "token_embd.weight" in tensors else tensors[0]
    return out


def tensor_types(plan: BitPlan, arch: str = "llama") -> dict[str, str]:
    """GGUF tensor name -> type (layers sharing one tensor must share its type)."""
    out: dict[str, str] = {}
    for layer, tensor in tensors_of(plan, arch).items():
        option = plan[layer]
        if tensor in out and out[tensor] != option:
            raise MpsearchError(f"layers for GGUF tensor {tensor!r} get different types", "tie them before searching")
        out[tensor] = option
    return out


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes of a tensor of ``shape`` (output channels first) in GGUF type ``qtype``: ggml's row size."""
    import gguf

    row = math.prod(shape[1:])
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]]
    if row % block:
        raise MpsearchError(f"rows of {row} weights are not whole {qtype} blocks of {block}", "use another type")
    return shape[0] * (row // block) * nbytes


class LlamaCpp(Target):
    name = "llama.cpp"
    runtime = "llama.cpp"
    default_options = tuple(GGUF_TYPES)
    accepted = ", ".join(GGUF_TYPES)

    def render(self, plan: BitPlan, arch: str | None = None) -> str:
        arch = arch or plan.provenance.get("architecture") or "llama"
        planned = plan.provenance.get("architecture")
        if planned and ARCHITECTURES.get(planned, planned) != ARCHITECTURES.get(arch, arch):
            raise MpsearchError(
                f"the plan was made for a {planned!r} model, not {arch!r}", f"export it with --arch {planned}"
            )
        lines = [f"^{re.escape(t)}$={o}" for t, o in tensor_types(plan, arch).items()]
        return "\n".join(lines) + "\n"


def bits_per_weight(plan: BitPlan, shapes: dict[str, tuple[int, ...]], arch: str = "llama") -> float:
    """Mean bits per weight of the planned tensors as a GGUF file stores them, by ggml's row sizes
    (``shapes``: layer -> weight shape, output channels first; a tied tensor counts once)."""
    layer_of = {tensor: layer for layer, tensor in reversed(tensors_of(plan, arch).items())}  # first layer wins
    total_bytes = sum(tensor_bytes(shapes[layer], plan[layer]) for layer in layer_of.values())
    return 8 * total_bytes / sum(math.prod(shapes[layer]) for layer in layer_of.values())
