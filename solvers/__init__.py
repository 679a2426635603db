"""Solvers: turn a cost table + budget into a bit plan. numpy and core types only; never torch."""

from solvers.base import Solver
from solvers.bruteforce import BruteForce
from solvers.core import CoreDP
from solvers.dp import DP
from solvers.evolutionary import Evolutionary
from solvers.greedy import Greedy
from solvers.ilp import ILP
from solvers.pareto import Pareto
from solvers.problem import Problem

REGISTRY = {
    "dp": DP,
    "core": CoreDP,
    "ilp": ILP,
    "greedy": Greedy,
    "evolutionary": Evolutionary,
    "bruteforce": BruteForce,
}


def get_solver(name: str, **params) -> Solver:
    """A validated solver by registry name; a wrong name or parameter is a one-line MpsearchError."""
    from mpsearch.core import MpsearchError
    from mpsearch.core.params import build

    if name not in REGISTRY:
        raise MpsearchError(f"unknown solver {name!r}", f"use one of {sorted(REGISTRY)}")
    return build(REGISTRY[name], **params)


__all__ = [
    "BruteForce",
    "CoreDP",
    "DP",
    "Evolutionary",
    "Greedy",
    "ILP",
    "Pareto",
    "Problem",
    "REGISTRY",
    "Solver",
    "get_solver",
]
