"""Sensitivity estimators: per-(layer, option) damage tables. Depends on torch and mpsearch's torch-level
modules (core types, quantizer, layer discovery); never on solvers."""

from sensitivity.base import Estimator
from sensitivity.entropy import Entropy
from sensitivity.fisher import Fisher
from sensitivity.hessian import HessianTrace
from sensitivity.measured import Measured
from sensitivity.relevance import Relevance
from sensitivity.sqnr import SQNR

REGISTRY = {
    "sqnr": SQNR,
    "hessian": HessianTrace,
    "fisher": Fisher,
    "entropy": Entropy,
    "relevance": Relevance,
    "measured": Measured,
}


def get_estimator(name: str, **params) -> Estimator:
    """A validated estimator by registry name; a wrong name or parameter is a one-line MpsearchError."""
    from mpsearch.core import MpsearchError
    from mpsearch.core.params import build

    if name not in REGISTRY:
        raise MpsearchError(f"unknown estimator {name!r}", f"use one of {sorted(REGISTRY)}")
    return build(REGISTRY[name], **params)


__all__ = [
    "Entropy",
    "Estimator",
    "Fisher",
    "HessianTrace",
    "Measured",
    "REGISTRY",
    "Relevance",
    "SQNR",
    "get_estimator",
]
