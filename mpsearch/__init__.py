"""mpsearch: mixed-precision bit-allocation search.

    import mpsearch
    result = mpsearch.search("minilm-l6", budget=mpsearch.Budget(avg_bits=4.0))
    quantized = mpsearch.apply_plan(model, result.plan)

Heavy modules (torch, the API, sensitivity, solvers) load lazily on first use, so that
``import mpsearch`` stays light and never imports ortools, optuna or matplotlib.
"""

from __future__ import annotations

import importlib

from mpsearch.core import (
    DEFAULT_OPTIONS,
    BitPlan,
    Budget,
    CostTable,
    InfeasibleBudgetError,
    InvalidPlanError,
    MpsearchError,
    Option,
    SearchResult,
    parse_option,
)

__version__ = "0.1.0"

_LAZY = {
    "search": "mpsearch.api",
    "estimate": "mpsearch.api",
    "solve": "mpsearch.api",
    "evaluate": "mpsearch.api",
    "plan_size": "mpsearch.api",
    "pareto": "mpsearch.api",
    "uniform_plan": "mpsearch.api",
    "apply_plan": "mpsearch.quant",
    "quantized": "mpsearch.quant",
    "quantize_weight": "mpsearch.quant",
    "quantize": "mpsearch.artifacts",
    "Quantizer": "mpsearch.quant.quantizer",
    "RTN": "mpsearch.quant.quantizer",
    "GPTQ": "mpsearch.quant.gptq",
    "discover": "mpsearch.layers",
    "load_model": "mpsearch.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, "load" if name == "load_model" else name)
    raise AttributeError(f"module 'mpsearch' has no attribute {name!r}")


__all__ = [
    "DEFAULT_OPTIONS",
    "BitPlan",
    "Budget",
    "CostTable",
    "InfeasibleBudgetError",
    "InvalidPlanError",
    "MpsearchError",
    "Option",
    "SearchResult",
    "parse_option",
    *_LAZY,
]
