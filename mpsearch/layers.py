"""Layer discovery: the quantizable weights of any model, by fully-qualified name, from a registry of types.

A **unit** of the plan is one weight tensor. The registry (``register_layer``, in the spirit of
optimum-quanto's ``register_qmodule``) says which module types own a quantizable weight and how it is laid
out: ``nn.Linear``, ``nn.Conv1d/2d`` (incl. depthwise), transformers' ``Conv1D`` (GPT-2; stored [in, out],
so its output channels are dim 1) and, optionally, ``nn.Embedding``. Modules that share one tensor (a tied
``lm_head`` and ``embed_tokens``) form ONE unit named after the first non-embedding module, with the others
as ``aliases``: it is counted once in every budget and quantized once. ``include``/``exclude`` select units
by FQN pattern (shell-style, or a regular expression after ``re:``), matched against every name of a unit;
an untied embedding joins only when an ``include`` pattern names it (or with ``include_embeddings=True``).
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from mpsearch.core import LayerInfo, MpsearchError
from mpsearch.data import hash_tensor
from mpsearch.outputs import evaluating, hooked, raw_call

INPUTS = ("matmul", "lookup", "call")


@dataclass(frozen=True)
class LayerType:
    """How a registered module type holds its weight and uses its input: everything the estimators and
    quantizers need to know of it (no ``isinstance`` dispatch elsewhere).

    ``inputs``: "matmul" (output = input @ W^T over the input's last dim: SQNR's input statistics and GPTQ's
    Hessian X^T X apply), "lookup" (rows of W picked by index: SQNR counts lookups; no GPTQ) or "call" (any
    other use, e.g. a convolution: SQNR calls the layer with dW; no GPTQ). ``depthwise(module)``: whether an
    instance is depthwise (its kind is then "depthwise_conv")."""

    module_type: type
    kind: str
    transposed: bool = False  # weight stored [in, out] (transformers Conv1D)
    optional: bool = False  # only discovered with include_embeddings=True
    inputs: str = "matmul"
    depthwise: Callable[[nn.Module], bool] | None = None

    def in_per_output(self, module: nn.Module) -> int:
        """Multiply-accumulates per output element."""
        if self.inputs == "lookup":
            return 0
        w = module.weight
        return int(w.shape[0]) if self.transposed else int(w[0].numel())

    def kind_of(self, module: nn.Module) -> str:
        return "depthwise_conv" if self.depthwise is not None and self.depthwise(module) else self.kind


_REGISTRY: list[LayerType] = []


def register_layer(
    module_type: type,
    kind: str,
    transposed: bool = False,
    optional: bool = False,
    inputs: str = "matmul",
    depthwise: Callable[[nn.Module], bool] | None = None,
) -> None:
    """Make ``module_type`` (and its subclasses) quantizable (see ``LayerType`` for the arguments). Later
    registrations take precedence."""
    if inputs not in INPUTS:
        raise MpsearchError(f"register_layer: inputs={inputs!r} is not one of {INPUTS}", "see LayerType")
    _REGISTRY.insert(0, LayerType(module_type, kind, transposed, optional, inputs, depthwise))


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


register_layer(nn.Embedding, "embedding", optional=True, inputs="lookup")
register_layer(nn.Conv2d, "conv2d", inputs="call", depthwise=_depthwise)
register_layer(nn.Conv1d, "conv1d", inputs="call", depthwise=_depthwise)
register_layer(nn.Linear, "linear")
_transformers_registered = False


def layer_type(module: nn.Module) -> LayerType | None:
    global _transformers_registered
    if not _transformers_registered and "transformers" in sys.modules:  # never import transformers ourselves
        from transformers.pytorch_utils import Conv1D

        register_layer(Conv1D, "linear", transposed=True)
        _transformers_registered = True
    for entry in _REGISTRY:
        if isinstance(module, entry.module_type) and isinstance(getattr(module, "weight", None), torch.Tensor):
            return entry
    return None


@dataclass(frozen=True)
class Unit:
    """One quantizable weight: the module that owns it, its type, and the modules sharing it."""

    name: str
    module: nn.Module
    type: LayerType
    aliases: tuple[str, ...] = ()

    @property
    def weight(self) -> torch.Tensor:
        """The weight with output channels first (a transposed view for Conv1D): what quantizers see."""
        w = self.module.weight
        return w.t() if self.type.transposed else w

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def matmuls(self, model: nn.Module) -> list[nn.Module]:
        """The modules that multiply their input (over its last dim) with this weight: the unit and the modules
        tied to it whose layer type's ``inputs`` is "matmul" (not an embedding's lookup, not a convolution)."""
        modules = [model.get_submodule(name) for name in self.names]
        return [m for m in modules if getattr(layer_type(m), "inputs", None) == "matmul"]

    def takes(self, option) -> bool:
        """Whether ``option``'s runtime can store this weight (a GGUF row must be whole blocks...): where not,
        the unit has no row for the option in a cost table and is never quantized with it."""
        return option.fits(tuple(self.weight.shape))


def find_units(model: nn.Module) -> list[Unit]:
    """Every quantizable weight of ``model`` (embeddings too) in module order, shared tensors merged into one
    unit."""
    groups: dict[int, list[tuple[str, nn.Module, LayerType]]] = {}
    position = {}
    for name, module in model.named_modules():
        entry = layer_type(module) if name else None
        if entry is not None:
            groups.setdefault(id(module.weight), []).append((name, module, entry))
            position[name] = len(position)
    units = []
    for group in groups.values():
        main = next((g for g in group if not g[2].optional), group[0])
        units.append(Unit(main[0], main[1], main[2], tuple(g[0] for g in group if g is not main)))
    return sorted(units, key=lambda u: position[u.name])


def unit_map(model: nn.Module) -> dict[str, Unit]:
    """Every name a plan may use (unit names and their aliases) -> its unit."""
    return {n: u for u in find_units(model) for n in u.names}


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as err:
            raise MpsearchError(
                f"pattern {pattern!r} is not a valid regular expression ({err})", "fix it, or use a shell pattern"
            ) from None
    return fnmatchcase(name, pattern)


def select_units(units: list[Unit], include=None, exclude=None, include_embeddings: bool = False) -> list[Unit]:
    """Keep units with a name matching an ``include`` pattern (all when None) and none matching ``exclude``.
    An embedding of its own (not tied to a Linear) is kept only with ``include_embeddings`` or when an
    ``include`` pattern names it. A pattern that matches no unit is an error: nothing is silently skipped."""
    chosen = [u for u in units if include_embeddings or include is not None or not u.type.optional]
    for label, patterns, keep in (("include", include, True), ("exclude", exclude, False)):
        if patterns is None:
            continue
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        for p in patterns:
            if not isinstance(p, str) or not any(_matches(p, n) for u in units for n in u.names):
                example = ", ".join(u.name for u in units[:3])
                raise MpsearchError(
                    f"{label} pattern {p!r} matches no quantizable layer",
                    f"use FQN patterns such as '*.mlp.*' or 're:.*proj' (layers are e.g. {example})",
                )
        hit = [any(_matches(p, n) for p in patterns for n in u.names) for u in chosen]
        chosen = [u for u, h in zip(chosen, hit) if h == keep]
    return chosen


def _macs(model: nn.Module, units: list[Unit], example) -> dict[str, int]:
    """MACs per sample of each unit (summed over the modules sharing its weight), from one forward pass."""
    macs = {u.name: 0 for u in units}
    modules = dict(model.named_modules())

    def hook(unit: Unit, entry: LayerType):
        def fn(module, inputs, output):
            batch = output.shape[0] if output.dim() > 1 else 1
            macs[unit.name] += output.numel() // batch * entry.in_per_output(module)

        return fn

    handles = (modules[n].register_forward_hook(hook(u, layer_type(modules[n]))) for u in units for n in u.names)
    with hooked(handles), torch.no_grad(), evaluating(model):
        raw_call(model, example)
    return macs


# sibling projections that runtimes fuse into one matmul (vLLM's qkv_proj / gate_up_proj; BERT's QKV)
_FUSED = [("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


def discover(
    model: nn.Module,
    example=None,
    tie_fused: bool = False,
    include_embeddings: bool = False,
    include=None,
    exclude=None,
) -> tuple[list[LayerInfo], list[list[str]]]:
    """The plan's units as LayerInfo (name, logical shape, kind, MACs, aliases) and tie groups.

    ``example``: one batch; when given, MACs per sample are recorded (needed for BOPs budgets). Ties: fused
    siblings (q/k/v, gate/up; Llama, Qwen2 and BERT naming; GPT-2's c_attn is one module already) when
    ``tie_fused``. The model is not modified (hooks are removed, no gradients are taken).
    """
    units = select_units(find_units(model), include, exclude, include_embeddings)
    macs = _macs(model, units, example) if example is not None and units else {}
    layers = [
        LayerInfo(
            u.name, tuple(u.weight.shape), u.type.kind_of(u.module), macs.get(u.name), u.aliases, u.type.transposed
        )
        for u in units
    ]
    ties = []
    if tie_fused:
        names = {u.name for u in units}
        for children in _FUSED:
            for parent in dict.fromkeys(u.name.rsplit(".", 1)[0] for u in units if "." in u.name):
                group = [f"{parent}.{child}" for child in children]
                if all(g in names for g in group):
                    ties.append(group)
    return layers, ties


def require_layers(layers: list[LayerInfo]) -> list[LayerInfo]:
    """The discovered layers, or a one-line error when there are none."""
    if not layers:
        raise MpsearchError(
            "the model has no quantizable layers",
            "use a model with Linear, Conv or transformers Conv1D layers, or loosen include=/exclude=",
        )
    return layers


def require_finite(units: list[Unit]) -> None:
    """A one-line error naming the first unit whose weight holds NaN or inf: every estimate and measurement
    of it would be meaningless (NaN damage reads as 0, a NaN metric as a number)."""
    for unit in units:
        if not bool(torch.isfinite(unit.weight).all()):
            raise MpsearchError(
                f"layer {unit.name!r} has non-finite weights (NaN or inf)", "load or fix the model's weights first"
            )


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the state dict (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        hash_tensor(h, tensor, name)
    return h.hexdigest()[:16]
