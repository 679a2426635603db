"""llama.cpp: GGUF types by their llama.cpp names (``f16 q8_0 q6_k q5_k q5_1 q5_0 q4_k q4_1 q4_0 iq4_nl iq4_xs
iq3_s q3_k iq3_xxs q2_k iq2_s iq2_xs``), blocks of 32 (``q*_0``/``q*_1``/``iq4_nl``) or 256 (``q*_k``/``iq*`` but
iq4_nl) weights along the row (f16: each weight on its own), each
stored in a fixed number of bytes (every scale, min and super-block field included): a layer whose rows are not
whole blocks cannot take the type. Math: llama-quantize's own (``mpsearch.quant.llama_cpp``; values decoded from
the very bytes a GGUF holds), without an importance matrix by default, with one under the ``imatrix``
quantizer (``mpsearch.quant.imatrix``). Written: a ``--tensor-type-file`` for ``llama-quantize`` (one
``^name$=type`` line per GGUF tensor), with the GGUF tensor names and sizes by llama.cpp's own rules."""

from __future__ import annotations

import functools
import math
import re

from mpsearch.core.errors import MpsearchError
from mpsearch.runtimes.base import Runtime

# GGUF type -> (nominal bits, weights per block, bytes per block): ggml's block structs (gguf.GGML_QUANT_SIZES)
GGUF_TYPES = {
    "f16": (16, 1, 2),  # the weights as fp16, and (CPU backend) the inputs too: no 8-bit input rounding
    "q8_0": (8, 32, 34),
    "q6_k": (6, 256, 210),
    "q5_k": (5, 256, 176),
    "q5_1": (5, 32, 24),
    "q5_0": (5, 32, 22),
    "q4_k": (4, 256, 144),
    "q4_1": (4, 32, 20),
    "q4_0": (4, 32, 18),
    "iq4_nl": (4, 32, 18),
    "iq4_xs": (4, 256, 136),
    "iq3_s": (3, 256, 110),
    "q3_k": (3, 256, 110),
    "iq3_xxs": (3, 256, 98),
    "q2_k": (2, 256, 84),
    "iq2_s": (2, 256, 82),
    "iq2_xs": (2, 256, 74),
}
# types llama-quantize makes only with an importance matrix (llama-quant.cpp's tensor_requires_imatrix: it
# refuses them otherwise); the ``imatrix`` quantizer offers them, round to nearest does not
IMATRIX_ONLY = frozenset({"iq3_xxs", "iq2_s", "iq2_xs"})

# transformers ``config.model_type`` -> gguf.MODEL_ARCH name (the converter's tensor name map)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "bert": "bert"}


NAME_MAP_BLOCKS = 128  # blocks one cached name map covers: a map of more blocks only adds names


@functools.lru_cache(maxsize=8)
def _name_map(model_arch, n_blocks: int):
    """gguf's name map for ``n_blocks`` blocks, built once (it costs ~50 ms; plans name hundreds of layers)."""
    import gguf

    return gguf.get_tensor_name_map(model_arch, n_blocks)


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
    names = _name_map(model_arch, -(-(max(blocks) + 1) // NAME_MAP_BLOCKS) * NAME_MAP_BLOCKS)
    for candidate in (layer, f"{key}.{layer}"):
        name = names.get_name(candidate + ".weight", try_suffixes=(".weight",))
        if name is not None:
            return name
    raise MpsearchError(
        f"layer {layer!r} has no GGUF tensor for architecture {arch!r}",
        "export a plan made for a model of this architecture, or pass its --arch",
    )


def tensors_of(plan, arch: str = "llama") -> dict[str, str]:
    """Plan layer -> the GGUF tensor llama.cpp stores it as. A tied layer (plan provenance ``aliases``, e.g.
    ``lm_head`` sharing ``model.embed_tokens``) is the embedding's tensor (``token_embd.weight``; a tied GGUF
    has no ``output.weight``)."""
    aliases = plan.provenance.get("aliases") or {}
    out = {}
    for layer in plan.assignments:
        tensors = [gguf_name(n, arch) for n in (layer, *aliases.get(layer, []))]
        out[layer] = "token_embd.weight" if "token_embd.weight" in tensors else tensors[0]
    return out


def tensor_types(plan, arch: str = "llama") -> dict[str, str]:
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


class LlamaCpp(Runtime):
    name = "llama.cpp"
    family = "llama.cpp"
    default_options = tuple(GGUF_TYPES)
    accepted = ", ".join(GGUF_TYPES)
    writer = "mpsearch.artifacts.gguf_file:write_gguf"
    writes_file = True

    def parse(self, name: str):
        from mpsearch.core.options import Option

        if name not in GGUF_TYPES:
            return None
        bits, block, nbytes = GGUF_TYPES[name]
        asym = name.endswith(("_1", "_k")) and name not in ("q6_k", "q3_k")  # types that store a min
        return Option(name, "gguf", bits, not asym, None, runtime=self.family, block_size=block, block_bytes=nbytes)

    def storage_unit(self, option) -> int | None:
        return option.block_size

    def input_rounding(self, option) -> str | None:
        """How the CPU backend rounds a matmul's input for ``option``: its vec_dot type (``llama_cpp_inputs``),
        Q8_1 named as Q8_0, whose levels it shares (so estimators round each input once for both)."""
        from mpsearch.runtimes.llama_cpp_inputs import VEC_DOT_TYPE

        vec_dot = VEC_DOT_TYPE[option.name]
        return "q8_0" if vec_dot == "q8_1" else vec_dot

    def round_input(self, x, rounding: str):
        from mpsearch.runtimes.llama_cpp_inputs import round_input

        return round_input(x, rounding)

    def scales_for(self, option, out_channels, row_length):
        return out_channels * 0  # scales live inside the blocks: storage_bits_for counts them

    def storage_bits_for(self, option, out_channels, row_length):
        return out_channels * (-(-row_length // option.block_size)) * option.block_bytes * 8

    def fake_quantize(self, w, option, imatrix=None):
        from mpsearch.quant.llama_cpp import fake_quantize

        return fake_quantize(w, option, imatrix)

    def quantize(self, w, option, imatrix=None):
        """Q(w) as ``Runtime.quantize`` (rows that are not whole blocks zero-padded), with the columns'
        importance ``imatrix`` (padded with zeros alike) or without one (llama.cpp's reference path)."""
        import torch

        rows = w.detach().reshape(w.shape[0], -1)
        pad = (-rows.shape[1]) % option.block_size
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
            imatrix = None if imatrix is None else torch.nn.functional.pad(imatrix, (0, pad))
        return self.fake_quantize(rows, option, imatrix)[:, : w[0].numel()].reshape(w.shape)

    def gptq_grid(self, option):
        """GPTQ's grid for the types ``mpsearch.quant.gptq_gguf`` covers: llama.cpp's blocks and decoder, the
        levels chosen with GPTQ's error feedback (None for the k-quants and the grid i-quants)."""
        from mpsearch.quant.gptq_gguf import grid_for

        return grid_for(option)

    def reference(self, w, option, imatrix=None):
        """ggml's row size (``gguf.GGML_QUANT_SIZES``) and gguf's own decoder of the bytes mpsearch writes
        (for Q4_0 ... Q8_0 without an imatrix also gguf's own quantizer: an independent path)."""
        import gguf
        import torch

        from mpsearch.quant.llama_cpp import ggml_type, quantize_rows

        rows = w.detach().reshape(w.shape[0], -1).float().numpy()
        packed = quantize_rows(rows, option, imatrix)[0].numpy()
        if option.name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0") and imatrix is None:
            packed = gguf.quants.quantize(rows, ggml_type(option))
        block, nbytes = gguf.GGML_QUANT_SIZES[ggml_type(option)]
        decoded = torch.from_numpy(gguf.quants.dequantize(packed, ggml_type(option)).copy()).reshape(w.shape)
        return rows.shape[0] * rows.shape[1] // block * nbytes, decoded

    def render(self, plan, arch: str | None = None, **kwargs) -> str:
        arch = arch or plan.provenance.get("architecture") or "llama"
        planned = plan.provenance.get("architecture")
        if planned and ARCHITECTURES.get(planned, planned) != ARCHITECTURES.get(arch, arch):
            raise MpsearchError(
                f"the plan was made for a {planned!r} model, not {arch!r}", f"export it with --arch {planned}"
            )
        lines = [f"^{re.escape(t)}$={o}" for t, o in tensor_types(plan, arch).items()]
        return "\n".join(lines) + "\n"

    def side_files(self, plan, out, quantizer=None, model=None) -> list[str]:
        """The ``--tensor-type-file`` beside the GGUF, so ``llama-quantize`` can make the same file, and, for a
        plan quantized with an imatrix, that imatrix in llama.cpp's format (``--imatrix``)."""
        import os
        from pathlib import Path

        from mpsearch.data import write_atomic
        from mpsearch.quant.imatrix import Imatrix

        path = Path(out).with_suffix(".tensor-types.txt")
        write_atomic(path, self.render(plan))
        written = [str(path)]
        if isinstance(quantizer, Imatrix):
            target = Path(out).with_suffix(".imatrix.gguf")
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            arch = getattr(getattr(model, "config", None), "model_type", None) or "llama"
            quantizer.save_gguf(tmp, model, ARCHITECTURES.get(arch, arch))
            tmp.replace(target)
            written.append(str(target))
        return written


def bits_per_weight(plan, shapes: dict[str, tuple[int, ...]], arch: str = "llama") -> float:
    """Mean bits per weight of the planned tensors as a GGUF file stores them, by ggml's row sizes
    (``shapes``: layer -> weight shape, output channels first; a tied tensor counts once)."""
    layer_of = {tensor: layer for layer, tensor in reversed(tensors_of(plan, arch).items())}  # first layer wins
    total_bytes = sum(tensor_bytes(shapes[layer], plan[layer]) for layer in layer_of.values())
    return 8 * total_bytes / sum(math.prod(shapes[layer]) for layer in layer_of.values())
