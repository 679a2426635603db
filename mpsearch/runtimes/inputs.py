"""A runtime's rounding of each planned layer's matmul input (``Runtime.input_rounding``; llama.cpp's CPU backend
rounds a quantized matmul's input to 8 bits), put on a model as forward pre-hooks: what ``evaluate``,
``PlanFitness`` and ``Measured`` use to measure the runtime's own computation, and what a plan searched with a
table that counted it (provenance ``runtime_inputs``) is measured with."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

from torch import nn

from mpsearch.runtimes.base import Runtime

Rounding = tuple[Runtime, str]  # a runtime and one of its input_rounding names


def rounding_of(option) -> Rounding | None:
    """(the runtime of ``option`` (an Option or its name), how it rounds a matmul's input), or None where it
    rounds none."""
    from mpsearch.core import parse_option
    from mpsearch.runtimes import runtime_of

    option = parse_option(option) if isinstance(option, str) else option
    runtime = runtime_of(option)
    rounding = runtime.input_rounding(option)
    return None if rounding is None else (runtime, rounding)


def unrounded(plan) -> list[str]:
    """The options of ``plan`` (a BitPlan or {layer: option}) whose runtime rounds no matmul input."""
    return [n for n in sorted(set(getattr(plan, "assignments", plan).values())) if rounding_of(n) is None]


@contextmanager
def rounded_inputs(model: nn.Module, plan):
    """Pre-hooks on ``model`` rounding each planned layer's input as its option's runtime does (a tied head,
    e.g. ``lm_head`` sharing the embedding, with the embedding's type: the model's own ties, whatever the plan
    records); layers whose runtime rounds nothing are left as they are. ``plan``: a BitPlan or {layer: option}.
    All hooks are removed on exit."""
    from mpsearch.layers import unit_map
    from mpsearch.outputs import hooked

    assignments: Mapping[str, str] = getattr(plan, "assignments", plan)
    units = unit_map(model)

    def hook(runtime, rounding):
        return lambda module, args: (runtime.round_input(args[0], rounding), *args[1:])

    def registrations():
        for layer, name in assignments.items():
            rounding = rounding_of(name)
            if rounding is not None:
                for module in units[layer].matmuls(model):  # the unit and the modules tied to it
                    yield module.register_forward_pre_hook(hook(*rounding))

    with hooked(registrations()):
        yield
