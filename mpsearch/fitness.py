"""PlanFitness: a plan's real loss on calibration data, for search that measures instead of predicting."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpsearch.core import BitPlan, parse_option
from mpsearch.data import LOSSES, as_batches, call_model, outputs
from mpsearch.layers import quantizable_modules
from mpsearch.quant import quantize_weight


class PlanFitness:
    """``fitness(plan)`` = mean label-free loss (``loss``: "kl" or "cosine") of the plan-quantized model
    against the full-precision outputs. Works on one private copy; quantized weights are cached per
    (layer, option), so a trial costs one forward pass over the batches. ``calls`` counts evaluations."""

    def __init__(self, model: nn.Module, data, loss: str = "kl") -> None:
        self.batches = as_batches(data)
        self.loss = LOSSES[loss]
        self.model = copy.deepcopy(model).eval()
        self.reference = outputs(self.model, self.batches)
        self.modules = quantizable_modules(self.model)
        self.original = {name: m.weight.detach().clone() for name, m in self.modules.items()}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.calls = 0

    def _weight(self, layer: str, option: str) -> torch.Tensor:
        key = (layer, option)
        if key not in self._cache:
            self._cache[key] = quantize_weight(self.original[layer], parse_option(option))
        return self._cache[key]

    @torch.no_grad()
    def __call__(self, plan: BitPlan) -> float:
        for name, module in self.modules.items():
            module.weight.copy_(self._weight(name, plan[name]) if name in plan.assignments else self.original[name])
        self.calls += 1
        losses = [float(self.loss(call_model(self.model, b), r)) for b, r in zip(self.batches, self.reference)]
        return sum(losses) / len(losses)
