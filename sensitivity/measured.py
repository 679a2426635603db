"""Measured (ground truth): quantize one layer at a time and measure the loss increase (ZeroQ-style)."""

from __future__ import annotations

from contextlib import nullcontext

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.outputs import Objective
from mpsearch.quant import swapped
from mpsearch.quant.quantizer import Quantizer
from mpsearch.runtimes.inputs import rounded_inputs
from sensitivity.base import NAN, Estimator, units_for


class Measured(Estimator):
    """damage[layer, option] = mean loss(model with only that layer quantized) - mean loss(full precision).

    The loss compares against the full-precision model's own outputs (label-free), so the baseline is ~0.
    Costs one pass over the calibration data per (layer, option), so its time grows as layers x parameters
    (use few calibration tokens on big models). The quantized layer is swapped in beside the original (one
    layer's extra memory), which is never written. ``runtime_inputs`` (default): where the option's runtime
    rounds a matmul's input (llama.cpp's CPU backend), the layer's inputs are rounded so too while it is
    measured (``mpsearch.runtimes.inputs.rounded_inputs``), so the damage is the runtime's.
    """

    name = "measured"
    _parameter_constraints = {"runtime_inputs": [bool], "progress": [bool]}

    def __init__(self, runtime_inputs: bool = True, progress: bool = True) -> None:
        self.runtime_inputs = runtime_inputs
        self.progress = progress

    @torch.no_grad()
    def _estimate(self, model: nn.Module, batches, layers, options, objective: Objective, quantizer: Quantizer):
        reference = objective.references(model, batches)
        base = objective.mean(model, batches, reference)
        rows = []
        bar = tqdm(total=len(layers) * len(options), desc="measured", disable=not self.progress, leave=False)
        for unit in units_for(model, layers):
            for opt in options:
                if not quantizer.takes(unit, opt):  # no row in the table: not measured
                    rows.append({"layer": unit.name, "option": opt.name, "damage": NAN, "loss": NAN})
                    bar.update()
                    continue
                rounding = rounded_inputs(model, {unit.name: opt.name}) if self.runtime_inputs else nullcontext()
                with swapped(model, {unit: quantizer.quantize(unit, opt)}), rounding:
                    loss = objective.mean(model, batches, reference)
                rows.append({"layer": unit.name, "option": opt.name, "damage": loss - base, "loss": loss})
                bar.update()
        bar.close()
        return pd.DataFrame(rows)
