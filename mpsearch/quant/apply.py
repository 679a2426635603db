"""Apply a BitPlan to a model: a fake-quantized deep copy (or the model itself with ``inplace=True``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpsearch.core import BitPlan, InvalidPlanError, parse_option
from mpsearch.layers import unit_map
from mpsearch.quant.formats import quantize_weight


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


def apply_plan(model: nn.Module, plan: BitPlan | dict, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` whose planned weights are fake-quantized (``model`` itself with ``inplace``).

    Layers the plan does not name stay in full precision. A shared weight (tied embeddings) is quantized
    once. A plan naming a layer the model does not have, or giving two options to one shared weight,
    raises InvalidPlanError before anything is changed.
    """
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for unit, option in resolve_plan(target, plan).items():
            unit.weight.copy_(quantize_weight(unit.weight, parse_option(option)))
    return target
