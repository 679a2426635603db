"""PlanFitness: a plan's real loss on calibration data, for search that measures instead of predicting."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from mpsearch.core import BitPlan
from mpsearch.data import as_batches
from mpsearch.layers import find_units
from mpsearch.outputs import OutputFn, evaluating, resolve_objective
from mpsearch.quant import swapped
from mpsearch.quant.apply import resolve_plan
from mpsearch.quant.quantizer import RTN, Quantizer
from mpsearch.replay import Replay
from mpsearch.runtimes.inputs import rounded_inputs


class PlanFitness:
    """``fitness(plan)`` = mean label-free loss (``loss``: "kl", "cosine", or None to decide from the output)
    of the plan-quantized model against the full-precision outputs, through the output convention
    (``output_fn`` overrides it). Works on the caller's model, never a copy: each call swaps the planned
    quantized weights in for its forward passes (``mpsearch.quant.swapped``) and puts the originals back, so
    the model is unchanged between calls. Quantized weights are kept per (layer, option) in use and only
    layers whose option changed are re-quantized, so a trial costs one forward pass over the batches; the
    memory beside the model is the current plan's quantized weights. ``calls`` counts evaluations.
    ``quantizer``: the ``Quantizer`` whose weights are measured (None: round to nearest, ``RTN``).
    ``replay`` (default): where the model is a chain of blocks, a pass recomputes only from the first block
    whose weights changed since the last call (``mpsearch.replay``; bit-identical losses).
    ``runtime_inputs``: round each planned layer's input as its runtime does (``mpsearch.runtimes.inputs``), as
    a table that counted it was estimated (the search passes its table's ``runtime_inputs``)."""

    def __init__(
        self,
        model: nn.Module,
        data,
        loss: str | None = None,
        output_fn: OutputFn | None = None,
        quantizer: Quantizer | None = None,
        replay: bool = True,
        runtime_inputs: bool = False,
    ) -> None:
        self.batches = as_batches(data)
        self.model, self.quantizer = model, RTN() if quantizer is None else quantizer
        self.runtime_inputs = runtime_inputs
        with evaluating(model), torch.no_grad():
            self.objective = resolve_objective(loss, output_fn, model, self.batches[0])
            self.reference = self.objective.references(model, self.batches)
        self._current: dict = {}  # unit -> (option, quantized weight) of the latest plan
        self._replay = Replay(model, find_units(model)) if replay else None
        self.calls = 0

    def __call__(self, plan: BitPlan) -> float:
        return float(np.mean(self.losses(plan)))

    @torch.no_grad()
    def losses(self, plan: BitPlan, give_up: Callable[[np.ndarray], bool] | None = None) -> np.ndarray:
        """The plan's loss on each batch (``fitness(plan)`` is their mean). ``give_up(even)``: asked once the
        even batches are measured (their losses); when it says True, the odd ones are left unmeasured (NaN):
        the measured check stops a move the even fold already rejects."""
        self._current = self._quantized(resolve_plan(self.model, plan))
        self.calls += 1
        n = len(self.batches)
        order = [*range(0, n, 2), *range(1, n, 2)]
        out = np.full(n, np.nan)
        weights = swapped(self.model, {u: q for u, (_, q) in self._current.items()})
        rounding = rounded_inputs(self.model, plan) if self.runtime_inputs else nullcontext()
        with evaluating(self.model), weights, rounding:
            for position, i in enumerate(order):
                if give_up is not None and position == (n + 1) // 2 and n > 1 and give_up(out[0::2]):
                    break
                if self._replay is None:
                    out[i] = float(self.objective(self.model, self.batches[i], self.reference[i]))
                    continue
                with self._replay.pass_from(i, self._current):
                    out[i] = float(self.objective(self.model, self.batches[i], self.reference[i]))
        return out

    def _quantized(self, wanted: dict) -> dict:
        return {
            unit: self._current[unit]
            if unit in self._current and self._current[unit][0] == option
            else (option, self.quantizer.quantize(unit, option))
            for unit, option in wanted.items()
        }
