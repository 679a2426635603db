"""The runtime registry: one ``Runtime`` per format family (``mpsearch.runtimes.base``), registered once here.

``get_runtime(name)`` finds a target by name (``--target``); ``runtime_of(option)`` the runtime that owns an
option (its sizes, shapes and math); ``parse(name)`` asks each runtime's grammar in registration order.
Adding a runtime: a module with a ``Runtime`` subclass, and one ``register_runtime(...)`` line below.
"""

from __future__ import annotations

from mpsearch.core.errors import InvalidOptionError, MpsearchError
from mpsearch.runtimes.base import Runtime

RUNTIMES: dict[str, Runtime] = {}  # target name -> runtime, in registration order
_FAMILIES: dict[str, Runtime] = {}  # Option.runtime -> the runtime whose grammar owns it


def register_runtime(runtime: Runtime) -> Runtime:
    """Make ``runtime`` a target and, unless it is ``writer_only``, the owner of its family's options."""
    if runtime.name in RUNTIMES:
        raise MpsearchError(f"runtime {runtime.name!r} is registered twice", "register each runtime once")
    RUNTIMES[runtime.name] = runtime
    if not runtime.writer_only:
        _FAMILIES[runtime.family] = runtime
    return runtime


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise MpsearchError(f"unknown target {name!r}", f"use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def runtime_of(option) -> Runtime:
    """The runtime whose sizes, shapes and math ``option`` (an ``Option``) follows."""
    return _FAMILIES[option.runtime]


def parse(name: str):
    """The ``Option`` of ``name`` from the first runtime whose grammar has it; else InvalidOptionError."""
    for runtime in _FAMILIES.values():
        option = runtime.parse(name)
        if option is not None:
            return option
    raise InvalidOptionError(
        f"unknown option {name!r}",
        "use " + "; or ".join(f"{r.accepted} ({r.name})" for r in _FAMILIES.values()) + " (e.g. int4_g128_asym)",
    )


from mpsearch.runtimes.gptqmodel import GPTQModel  # noqa: E402
from mpsearch.runtimes.hqq import HQQ  # noqa: E402
from mpsearch.runtimes.llama_cpp import LlamaCpp  # noqa: E402
from mpsearch.runtimes.native import Native, PlanJson  # noqa: E402
from mpsearch.runtimes.torchao import Torchao  # noqa: E402

register_runtime(Native())
register_runtime(LlamaCpp())
register_runtime(Torchao())
register_runtime(GPTQModel())
register_runtime(HQQ())
register_runtime(PlanJson())

__all__ = ["RUNTIMES", "Runtime", "get_runtime", "parse", "register_runtime", "runtime_of"]
