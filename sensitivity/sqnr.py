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
from mpsearch.quant import quantize_weight
from sensitivity.base import Estimator, LossFn


def _db(ratio: float) -> float:
    return -10 * math.log10(ratio) if ratio > 0 else math.inf


@torch.no_grad()
def noise_ratios(
    model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], progress: bool = False
) -> pd.DataFrame:
    """Per (layer, option): ``output_nsr`` = ||X (Q(W) - W)||^2 / ||layer output||^2 over the calibration
    batches and ``weight_nsr`` = ||Q(W) - W||^2 / ||W||^2, with both as dB (``sqnr_db``, ``sqnr_weight_db``).

    The output noise is the layer's response to the weight error alone (the layer itself called with weight
    Q(W) - W and zero bias), so any Linear/Conv subclass (static-padding convs...) is handled.
    """
    modules = dict(model.named_modules())
    deltas, weight_nsr = {}, {}
    for info in layers:
        w = modules[info.name].weight
        for opt in options:
            delta = quantize_weight(w, opt) - w
            deltas[info.name, opt.name] = delta
            weight_nsr[info.name, opt.name] = float(delta.double().pow(2).sum() / w.double().pow(2).sum())
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
        for batch in tqdm(batches, desc="sqnr", disable=not progress, leave=False):
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for (layer, option), n in noise.items():
        ratio = n / signal[layer] if signal[layer] > 0 else 0.0
        w_ratio = weight_nsr[layer, option]
        rows.append(
            {
                "layer": layer,
                "option": option,
                "output_nsr": ratio,
                "sqnr_db": _db(ratio),
                "weight_nsr": w_ratio,
                "sqnr_weight_db": _db(w_ratio),
            }
        )
    return pd.DataFrame(rows)


class SQNR(Estimator):
    """Output SQNR per (layer, option): 10 log10(||Y||^2 / ||Y_q - Y||^2) over calibration batches.

    damage = noise-to-signal power ratio 10^(-SQNR/10): every layer's relative output noise counts alike.
    Columns: ``sqnr_db`` (output), ``sqnr_weight_db`` (weights), ``output_nsr``, ``weight_nsr``.
    """

    name = "sqnr"

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def _estimate(self, model, batches, layers, options, loss_fn: LossFn):
        frame = noise_ratios(model, batches, layers, options, self.progress)
        return frame.assign(damage=frame["output_nsr"])
