"""PlanFitness: a plan's real loss on calibration data, for search that measures instead of predicting."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpsearch.core import BitPlan
from mpsearch.data import as_batches
from mpsearch.outputs import OutputFn, resolve_objective
from mpsearch.quant import quantize_weight
from mpsearch.quant.apply import resolve_plan


class PlanFitness:
    """``fitness(plan)`` = mean label-free loss (``loss``: "kl", "cosine", or None to decide from the output)
    of the plan-quantized model against the full-precision outputs, through the output convention
    (``output_fn`` overrides it). Works on one private copy; between calls only the units whose option
    changed are re-quantized (from their original weights), so a trial costs one forward pass over the
    batches. ``calls`` counts evaluations."""

    def __init__(self, model: nn.Module, data, loss: str | None = None, output_fn: OutputFn | None = None) -> None:
        self.batches = as_batches(data)
        self.model = copy.deepcopy(model).eval()
        self.objective = resolve_objective(loss, output_fn, self.model, self.batches[0])
        self.reference = self.objective.references(self.model, self.batches)
        self._original: dict = {}
        self._current: dict = {}  # unit -> option now applied (absent: full precision)
        self.calls = 0

    @torch.no_grad()
    def __call__(self, plan: BitPlan) -> float:
        wanted = resolve_plan(self.model, plan)
        for unit in set(self._current) | set(wanted):
            option = wanted.get(unit)
            if self._current.get(unit) == option:
                continue
            original = self._original.setdefault(unit, unit.weight.detach().clone())
            unit.weight.copy_(original if option is None else quantize_weight(original, option))
            self._current[unit] = option
        self.calls += 1
        return self.objective.mean(self.model, self.batches, self.reference)
