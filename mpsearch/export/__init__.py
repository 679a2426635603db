"""Exporters: one module per runtime, registered in ``TARGETS`` (the way torchao registers one handler per
config type). A target stores exactly the options searched for it (``--target``): ``export(plan, target)``
refuses any other option, naming the first layer that has one, and returns the file's text."""

from __future__ import annotations

from mpsearch.core import BitPlan, MpsearchError
from mpsearch.export.base import Target
from mpsearch.export.gptqmodel import GPTQModel, gptqmodel_dynamic
from mpsearch.export.hqq import HQQ, hqq_dynamic_config
from mpsearch.export.llama_cpp import LlamaCpp, gguf_name
from mpsearch.export.torchao import Torchao, torchao_config


class MpsearchPlan(Target):
    """mpsearch's own formats (``mpsearch.quantize``/``apply_plan``): the plan JSON."""

    name = "mpsearch"
    runtime = "mpsearch"
    accepted = "int<2-8>[_g<group>][_asym], fp8_e4m3, fp8_e5m2, fp4_e2m1, fp16"

    def render(self, plan: BitPlan) -> str:
        return plan.to_json()


class PlanJson(MpsearchPlan):
    """The plan JSON, whatever its options."""

    name = "json"

    def accepts(self, option) -> bool:
        return True


TARGETS: dict[str, Target] = {
    t.name: t for t in (MpsearchPlan(), LlamaCpp(), Torchao(), GPTQModel(), HQQ(), PlanJson())
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise MpsearchError(f"unknown target {name!r}", f"use one of {', '.join(TARGETS)}")
    return TARGETS[name]


def export(plan: BitPlan, target: str, **kwargs) -> str:
    return get_target(target).export(plan, **kwargs)


__all__ = [
    "TARGETS",
    "Target",
    "export",
    "get_target",
    "gguf_name",
    "gptqmodel_dynamic",
    "hqq_dynamic_config",
    "torchao_config",
]
