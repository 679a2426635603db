"""Exporters: each runtime's writer (``Runtime.render``), registered with the runtime itself in
``mpsearch.runtimes``. A target stores exactly the options searched for it (``--target``): ``export(plan,
target)`` refuses any other option, naming the first layer that has one, and returns the file's text."""

from __future__ import annotations

from mpsearch.core import BitPlan
from mpsearch.runtimes import RUNTIMES as TARGETS
from mpsearch.runtimes import Runtime as Target
from mpsearch.runtimes import get_runtime as get_target
from mpsearch.runtimes.gptqmodel import gptqmodel_dynamic
from mpsearch.runtimes.hqq import hqq_dynamic_config
from mpsearch.runtimes.llama_cpp import gguf_name
from mpsearch.runtimes.torchao import torchao_config


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
