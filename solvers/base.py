"""Solver base class."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from mpsearch.core import SearchResult
from mpsearch.core.params import Configurable
from solvers.problem import Problem


class Solver(Configurable, ABC):
    """Turns a :class:`Problem` into a :class:`SearchResult`. Constructor arguments are stored verbatim and
    checked against ``_parameter_constraints`` before solving."""

    component = "solver"
    name: str = "solver"
    exact: bool = False  # whether it proves optimality (conformance suites check exact solvers by brute force)

    def solve(self, problem: Problem) -> SearchResult:
        self.validate_params()
        start = time.perf_counter()
        self.extra_: dict = {}
        choice, status, gap = self._solve(problem)
        wall = time.perf_counter() - start
        result = problem.result(choice, status, self.name, self.get_params(), wall, gap)
        result.extra.update(self.extra_)  # solver-specific facts (e.g. measured fitness)
        return result

    @abstractmethod
    def _solve(self, problem: Problem) -> tuple[np.ndarray, str, float]:
        """Return (option index per unit, status, optimality gap)."""
