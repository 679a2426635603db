"""SQNR: signal-to-quantization-noise ratio of each layer's weights and outputs on calibration data."""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mpsearch.core import LayerInfo, Option
from mpsearch.data import call_model
from mpsearch.quant import quantize_weight, sqnr_db
from sensitivity.base import Estimator, LossFn


class SQNR(Estimator):
    """Output SQNR per (layer, option): 10 log10(||Y||^2 / ||Y_q - Y||^2) over calibration batches.

    The noise is the layer's response to the weight error alone (the layer called with weight
    Q(W) - W and no bias), so any Linear/Conv subclass (e.g. static-padding convs) is handled.
    damage = noise-to-signal power ratio 10^(-SQNR/10): every layer's relative output noise counts alike.
    Columns: ``sqnr_db`` (output), ``sqnr_weight_db`` (weights).
    """

    name = "sqnr"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    @torch.no_grad()
    def _estimate(
        self, model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], loss_fn: LossFn
    ):
        modules = dict(model.named_modules())
        deltas = {}
        weight_sqnr = {}
        for info in layers:
            w = modules[info.name].weight
            for opt in options:
                q = quantize_weight(w, opt)
                deltas[info.name, opt.name] = q - w
                weight_sqnr[info.name, opt.name] = sqnr_db(w, q)
        signal = {info.name: 0.0 for info in layers}
        noise = {key: 0.0 for key in deltas}
        busy = set()  # the hook calls its own module again: skip that re-entrant call

        def hook(name):
            module = modules[name]
            params = {"bias": torch.zeros_like(module.bias)} if module.bias is not None else {}

            def fn(mod, inputs, output):
                if name in busy:
                    return
                busy.add(name)
                signal[name] += float(output.double().pow(2).sum())
                for opt in options:
                    err = functional_call(mod, {**params, "weight": deltas[name, opt.name]}, inputs)
                    noise[name, opt.name] += float(err.double().pow(2).sum())
                busy.discard(name)

            return fn

        handles = [modules[i.name].register_forward_hook(hook(i.name)) for i in layers]
        try:
            for batch in tqdm(batches, desc="sqnr", disable=not self.progress, leave=False):
                call_model(model, batch)
        finally:
            for h in handles:
                h.remove()
        rows = []
        for (layer, option), n in noise.items():
            ratio = n / signal[layer] if signal[layer] > 0 else 0.0
            rows.append(
                {
                    "layer": layer,
                    "option": option,
                    "damage": ratio,
                    "sqnr_db": -10 * math.log10(ratio) if ratio > 0 else math.inf,
                    "sqnr_weight_db": weight_sqnr[layer, option],
                }
            )
        return pd.DataFrame(rows)
