"""Saved models for transformers runtimes, written from the checkpoint folder a plan was searched on.

- torchao: transformers loads the checkpoint with a ``TorchAoConfig`` of the plan's ``FqnToConfig`` (torchao
  quantizes each planned Linear as it loads) and ``save_pretrained`` writes it; ``from_pretrained(out)``
  reloads the torchao tensors, whose ``dequantize()`` is mpsearch's fake quantization (the conformance suite
  checks this per option).
- HQQ: transformers 5's ``HqqConfig`` cannot load yet ("QuantizationMethod.HQQ is not available yet"), so
  HQQ's own ``AutoHQQHFModel`` quantizes the planned layers (with the compute dtype mpsearch's HQQ math uses,
  fp16) and ``save_quantized`` writes the folder ``AutoHQQHFModel.from_quantized`` reloads.

Both load the checkpoint again rather than copying the caller's model: torchao quantizes while loading, and
the caller's model is never changed. The model passed is used for shapes and dtype only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mpsearch.artifacts import require_rtn
from mpsearch.core import MpsearchError


def checkpoint_of(model, source) -> Path:
    """The transformers folder to load again: ``source``, else the folder the model was loaded from."""
    folder = Path(source) if source else Path(getattr(model, "name_or_path", "") or "")
    if not source and not (folder.is_dir() and (folder / "config.json").is_file()):
        raise MpsearchError(
            "torchao and HQQ files are written from the model's checkpoint folder, and this model names none",
            "pass source= the folder it was loaded from (save it with save_pretrained first)",
        )
    if not (folder / "config.json").is_file():
        raise MpsearchError(f"{folder} is not a transformers folder (no config.json)", "pass the checkpoint folder")
    return folder


def refuse_tied(model, plan, runtime: str) -> None:
    """A weight tied to the embedding is quantized once by the search (the lookups see it too); transformers'
    torchao loader and HQQ's patcher leave the embedding in full precision (HQQ also requantizes the copy it
    gives lm_head), so no file of theirs holds such a plan."""
    from mpsearch.layers import unit_map

    units = unit_map(model)
    tied = [layer for layer in plan.assignments if units[layer].aliases]
    if tied:
        raise MpsearchError(
            f"{runtime} cannot store {tied[0]!r} as searched: it is tied to {units[tied[0]].aliases[0]!r}, and "
            f"{runtime} keeps that in full precision apart from it",
            f"search again with --exclude {tied[0]}",
        )


def stored_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def write_torchao(model, plan, quantizer, out: Path, source=None, progress: bool = True) -> dict:
    from mpsearch.quant.torchao_affine import require_torchao

    require_torchao()
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from mpsearch.models import quiet_transformers
    from mpsearch.runtimes.torchao import torchao_config

    require_rtn(quantizer, "torchao")
    refuse_tied(model, plan, "torchao")
    folder = checkpoint_of(model, source)
    config = TorchAoConfig(quant_type=torchao_config(plan))
    with quiet_transformers():
        q = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=model.dtype)
    sizes = {}
    for layer in plan.assignments:
        w = q.get_submodule(layer).weight
        if not hasattr(w, "qdata"):
            raise MpsearchError(f"transformers' TorchAoConfig left {layer!r} in full precision", "report this")
        sizes[layer] = stored_bytes((w.qdata, w.scale, w.zero_point))
    q.save_pretrained(out)
    info: dict = {"tensor_bytes": sizes}
    if model.dtype not in (torch.bfloat16, torch.float16):
        info["note"] = (
            f"torchao stores scales in the model's dtype ({str(model.dtype).removeprefix('torch.')} here), the search "
            "charged them as bf16 (2 bytes, as torchao models are run): load with --dtype bfloat16 for that size"
        )
    return info


def write_hqq(model, plan, quantizer, out: Path, source=None, progress: bool = True) -> dict:
    from mpsearch.quant.hqq_quant import require_hqq

    require_hqq("writing an HQQ model")
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    from mpsearch.models import quiet_transformers
    from mpsearch.runtimes.hqq import hqq_dynamic_config, hqq_tag

    require_rtn(quantizer, "HQQ")
    refuse_tied(model, plan, "HQQ")
    folder = checkpoint_of(model, source)
    with quiet_transformers():
        fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype)
    configs: dict = {hqq_tag(n): None for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)}
    configs.update({tag: BaseQuantizeConfig(**cfg) for tag, cfg in hqq_dynamic_config(plan).items()})
    planned = {hqq_tag(layer) for layer in plan.assignments}
    tagged = {n for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear) and hqq_tag(n) in planned}
    if tagged != set(plan.assignments):
        raise MpsearchError(
            "HQQ quantizes every Linear of a tag, and the plan leaves some of a planned tag out",
            "search with --target hqq over all layers (its ties give every layer of a tag one option)",
        )
    AutoHQQHFModel.quantize_model(fresh, quant_config=configs, compute_dtype=torch.float16, device=str(model.device))
    sizes = {}
    for layer in plan.assignments:
        m = fresh.get_submodule(layer)
        sizes[layer] = stored_bytes((m.W_q, m.meta["scale"], m.meta["zero"]))
    AutoHQQHFModel.save_quantized(fresh, str(out))
    return {"tensor_bytes": sizes}
