"""Apply a BitPlan to a model: in place, as a fake-quantized copy, or for the length of a ``with`` block.

``quantized(model, plan)`` is the memory-frugal way to measure a plan: the planned modules see quantized
weights inside the block, and their own Parameters, never written, are put back on exit (also on error),
so the model is byte-identical afterwards and only the planned weights' quantized values are held beside it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from mpsearch.core import BitPlan, InvalidPlanError, parse_option
from mpsearch.layers import Unit, unit_map
from mpsearch.quant.quantizer import Quantizer, for_plan


def resolve_plan(model: nn.Module, plan: BitPlan | dict) -> dict:
    """{unit: option} for a plan whose keys are unit names or their aliases; checks every key and that the
    names of one shared weight do not get different options."""
    plan = plan if isinstance(plan, BitPlan) else BitPlan(plan)
    units = unit_map(model)
    plan.check_layers(list(units), require_all=False)
    chosen: dict = {}
    for name, option in plan.items():
        unit = units[name]
        if unit in chosen and chosen[unit][1] != option:
            raise InvalidPlanError(
                f"layer {name!r} shares its weight with {chosen[unit][0]!r}, planned as {chosen[unit][1]!r}, "
                f"but gets {option!r}",
                "give tied layers the same option",
            )
        chosen.setdefault(unit, (name, option))
    return {unit: option for unit, (_, option) in chosen.items()}


@contextmanager
def swapped(model: nn.Module, weights: Mapping[Unit, torch.Tensor]) -> Iterator[nn.Module]:
    """Inside the block, each unit's modules (aliases too) hold ``weights[unit]`` (output channels first, as
    ``Unit.weight``) as their weight. The original Parameter objects are only set aside, never written, and
    are put back on exit, even when the block raises: restoring is exact by construction."""
    saved: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for unit, value in weights.items():
            value = value.t() if unit.type.transposed else value
            replacement = nn.Parameter(value.detach(), requires_grad=False)
            for name in unit.names:
                module = model.get_submodule(name)
                saved.append((module, module._parameters["weight"]))
                module._parameters["weight"] = replacement
        if os.environ.get("MPSEARCH_TEST_HOLD"):  # test hook: a signal test interrupts here (testing.hold)
            from mpsearch.testing import hold

            hold()
        yield model
    finally:
        for module, original in reversed(saved):
            module._parameters["weight"] = original


@torch.no_grad()
def quantized_weights(model: nn.Module, plan: BitPlan | dict, quantizer: Quantizer) -> dict[Unit, torch.Tensor]:
    """{unit: its fake-quantized weight (output channels first)} for the plan's units, one layer at a time."""
    return {unit: quantizer.quantize(unit, parse_option(opt)) for unit, opt in resolve_plan(model, plan).items()}


@contextmanager
def quantized(
    model: nn.Module, plan: BitPlan | dict, quantizer=None, calibration: Iterable | None = None
) -> Iterator[nn.Module]:
    """``with quantized(model, plan):`` the model computes with the plan's fake-quantized weights; on exit it
    is exactly the model it was. Holds the planned weights' quantized values (not a copy of the model).
    ``quantizer``/``calibration``: as for ``apply_plan``."""
    q = for_plan(model, plan, quantizer, calibration, "apply")
    with swapped(model, quantized_weights(model, plan, q)):
        yield model


def apply_plan(
    model: nn.Module, plan: BitPlan | dict, inplace: bool = False, quantizer=None, calibration: Iterable | None = None
) -> nn.Module:
    """Return a copy of ``model`` whose planned weights are fake-quantized, or, with ``inplace=True``, quantize
    ``model`` itself one layer at a time (no second copy: for models that barely fit in memory).

    The math is the plan's own quantizer (its provenance's ``spec()``; ``mpsearch.quant.quantizer.for_plan``):
    round to nearest, or a GPTQ passed as ``quantizer`` or rebuilt exactly from ``calibration`` (the data given
    to search) or the cache; a GPTQ plan with none of these is refused, never applied with other math.
    Layers the plan does not name stay in full precision. A shared weight (tied embeddings) is quantized
    once. A plan naming a layer the model does not have, or giving two options to one shared weight,
    raises InvalidPlanError before anything is changed (or copied).
    """
    resolve_plan(model, plan)
    q = for_plan(model, plan, quantizer, calibration, "apply")  # state keyed by unit name: serves the copy too
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for unit, option in resolve_plan(target, plan).items():
            unit.weight.copy_(q.quantize(unit, parse_option(option)))
    return target
