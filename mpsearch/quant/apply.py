"""Apply a BitPlan to a model: a fake-quantized deep copy; the caller's model is untouched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpsearch.core import BitPlan, InvalidPlanError, parse_option
from mpsearch.layers import quantizable_modules
from mpsearch.quant.formats import quantize_weight


def apply_plan(model: nn.Module, plan: BitPlan | dict, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` whose planned layers' weights are fake-quantized.

    Layers the plan does not name stay in full precision. A plan naming a layer the model does not have,
    or giving two different options to one shared weight, raises InvalidPlanError.
    """
    plan = plan if isinstance(plan, BitPlan) else BitPlan(plan)
    target = model if inplace else copy.deepcopy(model)
    modules = quantizable_modules(target)
    plan.check_layers(list(modules), require_all=False)
    done: dict[int, str] = {}
    with torch.no_grad():
        for name, option in plan.items():
            weight = modules[name].weight
            key = id(weight)
            if key in done:  # shared weight: quantized once; tied layers must agree
                if done[key] != option:
                    raise InvalidPlanError(
                        f"layer {name!r} shares its weight with a layer planned as {done[key]!r} but gets {option!r}",
                        "give tied layers the same option",
                    )
                continue
            weight.copy_(quantize_weight(weight, parse_option(option)))
            done[key] = option
    return target
