"""The GGUF file llama.cpp loads, written from a GGUF source and a llama.cpp plan.

Metadata and tokenizer are copied from the source; each planned tensor is written in its planned type, its
bytes packed by mpsearch's bit-exact llama.cpp quantizers from the model's own weight (the very values the
search quantized), every other tensor as the source holds it. One tensor is held at a time. The rows of a
weight are put in the GGUF's order with transformers' own GGUF tensor processor (llama's q/k permutation),
and each planned weight is checked against the source's tensor first, so a model or plan that is not this
GGUF's is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mpsearch.core import MpsearchError, parse_option

CHECK_ATOL = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # model weight vs GGUF tensor


def reader_of(path: str | Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise MpsearchError(
            f"{path} is not a readable GGUF file ({err})", "pass the .gguf the model came from"
        ) from None


def field(reader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def copy_metadata(reader, writer, rename=None, values: dict | None = None) -> None:
    """Every key/value of ``reader`` into ``writer``, as gguf's own ``gguf_new_metadata.py`` copies them (the
    architecture and the reader's virtual ``GGUF.*`` fields are the writer's own); ``rename(key)`` and
    ``values[key]`` change keys and values on the way."""
    import gguf

    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        key = rename(f.name) if rename else f.name
        writer.add_key_value(key, (values or {}).get(f.name, f.contents()), f.types[0], sub_type=sub)


def row_order(model, tensor: str, arch: str, rows: int) -> np.ndarray:
    """``perm`` with model_rows = gguf_rows[perm]: transformers' own GGUF processor for ``arch`` applied to
    the row indices (identity for tensors it does not permute)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    perm = processor.process(index, tensor).weights
    return np.asarray(perm).reshape(-1).astype(np.int64)


def planned_rows(model, plan, reader, arch: str) -> dict[str, tuple[object, str]]:
    """GGUF tensor -> (its unit, planned type), each tensor's shape checked against the model's weight."""
    from mpsearch.layers import unit_map
    from mpsearch.runtimes.llama_cpp import tensor_types, tensors_of

    units = unit_map(model)
    types = tensor_types(plan, arch)
    source = {t.name: t for t in reader.tensors}
    out = {}
    for layer, name in tensors_of(plan, arch).items():
        t = source.get(name)
        shape = tuple(units[layer].weight.shape)
        if t is None or tuple(int(n) for n in reversed(t.shape)) != shape:
            found = "no such tensor" if t is None else f"shape {tuple(int(n) for n in reversed(t.shape))}"
            raise MpsearchError(
                f"plan layer {layer!r} {shape} is GGUF tensor {name!r}, but the GGUF has {found}",
                "pass the GGUF of the model the plan was searched on",
            )
        out.setdefault(name, (units[layer], types[name]))
    return out


def gguf_type(qtype: str):
    import gguf

    return gguf.GGMLQuantizationType[qtype.upper()]


def check_weight(weight: torch.Tensor, tensor, perm: np.ndarray, layer: str) -> None:
    """Refuse a model weight that is not the source tensor (up to the dtype the model was loaded in)."""
    import gguf

    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape[0], -1)[perm]
    mine = weight.detach().float().cpu().reshape(weight.shape[0], -1).numpy()
    if values.shape != mine.shape or not np.allclose(mine, values, rtol=0, atol=CHECK_ATOL.get(weight.dtype, 1e-3)):
        raise MpsearchError(
            f"layer {layer!r} of the model is not tensor {tensor.name!r} of the GGUF",
            "pass the GGUF the model was loaded from (and a plan searched on that model)",
        )


def write_gguf(model, plan, quantizer, out: Path, source: str | Path, progress: bool = True) -> dict:
    """Write ``out`` (see the module docstring); returns what was written, sizes by tensor."""
    import gguf
    from tqdm.auto import tqdm

    from mpsearch.artifacts import require_rtn
    from mpsearch.quant.gptq import GPTQ
    from mpsearch.quant.imatrix import Imatrix
    from mpsearch.quant.llama_cpp import quantize_rows

    gptq = isinstance(quantizer, GPTQ)  # GPTQ on llama.cpp's blocks: its own bytes (mpsearch.quant.gptq_gguf)
    if not (gptq or isinstance(quantizer, Imatrix)):  # llama-quantize's math: with an imatrix, or the reference
        require_rtn(quantizer, "llama.cpp")
    if source is None:
        raise MpsearchError(
            "llama.cpp files are written from the GGUF the model was loaded from, and none is given",
            "pass source= that .gguf (for a transformers model: its F16 GGUF from convert_hf_to_gguf.py)",
        )
    reader = reader_of(source)
    arch = str(field(reader, gguf.Keys.General.ARCHITECTURE))
    planned = planned_rows(model, plan, reader, arch)
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    alignment = field(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment)
    copy_metadata(reader, writer)
    sizes = {}
    for t in reader.tensors:
        if t.name in planned:
            unit, qtype = planned[t.name]
            opt = parse_option(qtype)
            shape = (unit.weight.shape[0], unit.weight[0].numel() // opt.block_size * opt.block_bytes)
            sizes[t.name] = shape[0] * shape[1]
            writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), sizes[t.name], gguf_type(qtype))
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tqdm(reader.tensors, desc="writing GGUF tensors", unit="tensor", disable=not progress):
        if t.name not in planned:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            continue
        unit, qtype = planned[t.name]
        w = unit.weight.detach()
        perm = row_order(model, t.name, arch, w.shape[0])
        check_weight(w, t, perm, unit.name)
        if gptq:
            packed, _ = quantizer.packed(unit, parse_option(qtype))
        else:
            importance = quantizer.importance(unit) if isinstance(quantizer, Imatrix) else None
            packed, _ = quantize_rows(w.float().reshape(w.shape[0], -1), parse_option(qtype), importance)
        writer.write_tensor_data(np.ascontiguousarray(packed.cpu().numpy()[np.argsort(perm)]))
    writer.close()
    return {"arch": arch, "tensor_bytes": sizes}
