"""Layer discovery: quantizable layers by fully-qualified name, MACs, and tie groups."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from mpsearch.core import LayerInfo
from mpsearch.data import call_model, hash_tensor

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# sibling projections that runtimes fuse into one matmul and therefore quantize alike
_FUSED = [("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def quantizable_modules(model: nn.Module, include_embeddings: bool = False) -> dict[str, nn.Module]:
    kinds = QUANTIZABLE + ((nn.Embedding,) if include_embeddings else ())
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds) and name}


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d | nn.Conv1d) and module.groups > 1 and module.groups == module.in_channels:
        return "depthwise_conv"
    return type(module).__name__.lower()


def _macs(model: nn.Module, modules: dict[str, nn.Module], example) -> dict[str, int]:
    macs: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            batch = output.shape[0] if output.dim() > 1 else 1
            per_out = module.weight[0].numel()  # Linear: in_features; Conv: in/groups * kernel
            if isinstance(module, nn.Embedding):
                per_out = 0
            macs[name] = macs.get(name, 0) + output.numel() // batch * per_out

        return fn

    for name, module in modules.items():
        hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    return macs


def discover(
    model: nn.Module, example=None, tie_fused: bool = False, include_embeddings: bool = False
) -> tuple[list[LayerInfo], list[list[str]]]:
    """Quantizable layers (Linear, Conv1d/2d incl. depthwise; Embedding optionally) and tie groups.

    ``example``: one batch; when given, MACs per sample are recorded (needed for BOPs budgets).
    Ties: layers sharing one weight tensor always; fused siblings (q/k/v, gate/up) when ``tie_fused``.
    The model is not modified (hooks are removed, no gradients are taken).
    """
    modules = quantizable_modules(model, include_embeddings)
    macs = _macs(model, modules, example) if example is not None else {}
    layers = [LayerInfo(n, tuple(m.weight.shape), _kind(m), macs.get(n)) for n, m in modules.items()]
    by_weight: dict[int, list[str]] = {}
    for name, module in modules.items():
        by_weight.setdefault(id(module.weight), []).append(name)
    ties = [group for group in by_weight.values() if len(group) > 1]
    if tie_fused:
        for names in _FUSED:
            for parent in {n.rsplit(".", 1)[0] for n in modules if "." in n}:
                group = [f"{parent}.{child}" for child in names]
                if all(g in modules for g in group):
                    ties.append(group)
    return layers, ties


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the state dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        hash_tensor(h, tensor, name)
    return h.hexdigest()[:16]
