"""PlanFitness: a plan's real loss on calibration data, for search that measures instead of predicting."""

from __future__ import annotations

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


UNCHANGED = 2**62  # "the first changed block" of a plan equal to the last one: every block replays


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
    whose weights changed since the last call (``mpsearch.replay``; bit-identical losses)."""

    def __init__(
        self,
        model: nn.Module,
        data,
        loss: str | None = None,
        output_fn: OutputFn | None = None,
        quantizer: Quantizer | None = None,
        replay: bool = True,
    ) -> None:
        self.batches = as_batches(data)
        self.model, self.quantizer = model, RTN() if quantizer is None else quantizer
        with evaluating(model), torch.no_grad():
            self.objective = resolve_objective(loss, output_fn, model, self.batches[0])
            self.reference = self.objective.references(model, self.batches)
        self._current: dict = {}  # unit -> (option, quantized weight) of the latest plan
        self._replay = Replay(model, [u for u in find_units(model)]) if replay else None
        self.calls = 0

    def __call__(self, plan: BitPlan) -> float:
        return float(np.mean(self.losses(plan)))

    @torch.no_grad()
    def losses(self, plan: BitPlan) -> np.ndarray:
        """The plan's loss on each batch (``fitness(plan)`` is their mean)."""
        wanted = resolve_plan(self.model, plan)
        before, self._current = self._current, self._quantized(wanted)
        self.calls += 1
        with evaluating(self.model), swapped(self.model, {u: q for u, (_, q) in self._current.items()}):
            if self._replay is None:
                return np.array(self.objective.losses(self.model, self.batches, self.reference))
            changed = [u for u in before.keys() | self._current.keys() if before.get(u) is not self._current.get(u)]
            first = min((self._replay.block_of(u) for u in changed), default=UNCHANGED)
            out = []
            for i, (batch, reference) in enumerate(zip(self.batches, self.reference)):
                with self._replay.pass_from(i, first):
                    out.append(float(self.objective(self.model, batch, reference)))
            return np.array(out)

    def _quantized(self, wanted: dict) -> dict:
        return {
            unit: self._current[unit]
            if unit in self._current and self._current[unit][0] == option
            else (option, self.quantizer.quantize(unit, option))
            for unit, option in wanted.items()
        }
