"""Measured (ground truth): quantize one layer at a time and measure the loss increase (ZeroQ-style)."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.core import LayerInfo, Option
from mpsearch.data import call_model, outputs
from mpsearch.quant import quantize_weight
from sensitivity.base import Estimator, LossFn


class Measured(Estimator):
    """damage[layer, option] = mean loss(model with only that layer quantized) - mean loss(full precision).

    The loss compares against the full-precision model's own outputs (label-free), so the baseline is ~0.
    Costs one pass over the calibration data per (layer, option).
    """

    name = "measured"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    @torch.no_grad()
    def _estimate(
        self, model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], loss_fn: LossFn
    ):
        reference = outputs(model, batches)

        def mean_loss() -> float:
            return sum(float(loss_fn(call_model(model, b), r)) for b, r in zip(batches, reference)) / len(batches)

        base = mean_loss()
        modules = dict(model.named_modules())
        rows = []
        bar = tqdm(total=len(layers) * len(options), desc="measured", disable=not self.progress, leave=False)
        for info in layers:
            weight = modules[info.name].weight
            original = weight.detach().clone()
            for opt in options:
                weight.copy_(quantize_weight(original, opt))
                loss = mean_loss()
                rows.append({"layer": info.name, "option": opt.name, "damage": loss - base, "loss": loss})
                bar.update()
            weight.copy_(original)
        bar.close()
        return pd.DataFrame(rows)
