"""Solver base class."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from mpsearch.core import SearchResult
from solvers.problem import Problem


class Solver(ABC):
    """Turns a :class:`Problem` into a :class:`SearchResult`. Constructor arguments are stored verbatim."""

    name: str = "solver"

    def get_params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def solve(self, problem: Problem) -> SearchResult:
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
