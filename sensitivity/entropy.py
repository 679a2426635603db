"""Entropy (QuantMCU / LUQ idea): layers whose activations carry little information tolerate fewer bits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from mpsearch.core import LayerInfo, Option
from mpsearch.data import call_model
from sensitivity.base import Estimator, LossFn, weight_perturbations


def histogram_entropy(values: torch.Tensor, bins: int) -> float:
    """Shannon entropy in bits of a ``bins``-bin histogram over the values' range."""
    values = values.detach().float().reshape(-1)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return 0.0
    counts = torch.histc(values, bins=bins, min=lo, max=hi).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


class Entropy(Estimator):
    """damage = weight noise-to-signal ratio x 2^(H_act - mean H_act).

    ``H_act`` is the entropy (bits, ``bins``-bin histogram) of the layer's input activations on the calibration
    data: a layer fed high-entropy activations passes more information, so the same relative weight noise
    costs more there (QuantMCU assigns bits by feature-map entropy; LUQ by the information a format keeps).
    The weight term is ||Q(W) - W||^2 / ||W||^2, which falls ~6 dB per bit. Columns: ``entropy`` (activation
    entropy), ``weight_entropy``, ``weight_nsr``. Activations are subsampled to ``max_values`` per layer with
    ``seed``.
    """

    name = "entropy"

    def __init__(self, bins: int = 256, max_values: int = 200_000, seed: int = 0, progress: bool = True) -> None:
        self.bins = bins
        self.max_values = max_values
        self.seed = seed
        self.progress = progress

    @torch.no_grad()
    def _estimate(
        self, model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], loss_fn: LossFn
    ):
        gen = torch.Generator().manual_seed(self.seed)
        modules = dict(model.named_modules())
        collected: dict[str, list[torch.Tensor]] = {info.name: [] for info in layers}

        def hook(name):
            def fn(mod, inputs, output):
                x = inputs[0].reshape(-1)
                keep = max(1, self.max_values // len(batches))
                if x.numel() > keep:
                    x = x[torch.randint(0, x.numel(), (keep,), generator=gen)]
                collected[name].append(x)

            return fn

        handles = [modules[i.name].register_forward_hook(hook(i.name)) for i in layers]
        try:
            for batch in batches:
                call_model(model, batch)
        finally:
            for h in handles:
                h.remove()
        h_act = {name: histogram_entropy(torch.cat(xs), self.bins) for name, xs in collected.items()}
        h_w = {i.name: histogram_entropy(modules[i.name].weight, self.bins) for i in layers}
        mean_h = float(np.mean(list(h_act.values())))
        perturb = weight_perturbations(model, layers, options)
        energy = {i.name: float(modules[i.name].weight.double().pow(2).sum()) for i in layers}
        frame = pd.DataFrame(
            [
                {"layer": layer, "option": option, "weight_nsr": d / energy[layer]}
                for (layer, option), d in perturb.items()
            ]
        )
        frame["entropy"] = frame["layer"].map(h_act)
        frame["weight_entropy"] = frame["layer"].map(h_w)
        frame["damage"] = frame["weight_nsr"] * frame["entropy"].map(lambda h: math.pow(2.0, h - mean_h))
        return frame
