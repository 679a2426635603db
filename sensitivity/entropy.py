"""Entropy (QuantMCU / LUQ idea): layers whose activations carry little information tolerate fewer bits."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from mpsearch.core.params import Interval
from mpsearch.outputs import Objective, hooked, model_device, raw_call
from mpsearch.quant.quantizer import Quantizer
from sensitivity.base import Estimator, units_for, weight_perturbations
from sensitivity.sums import dot64


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
    memory_hint = "lower max_values (activation values kept per layer) or use smaller calibration batches"
    _parameter_constraints = {
        "bins": [Interval(int, 2)],
        "max_values": [Interval(int, 1)],
        "seed": [Interval(int, 0)],
        "progress": [bool],
    }

    def __init__(self, bins: int = 256, max_values: int = 200_000, seed: int = 0, progress: bool = True) -> None:
        self.bins = bins
        self.max_values = max_values
        self.seed = seed
        self.progress = progress

    @torch.no_grad()
    def _estimate(self, model: nn.Module, batches, layers, options, objective: Objective, quantizer: Quantizer):
        gen = torch.Generator(device=model_device(model)).manual_seed(self.seed)
        units = units_for(model, layers)
        collected: dict[str, list[torch.Tensor]] = {u.name: [] for u in units}

        def hook(name):
            def fn(mod, inputs, output):
                x = inputs[0].reshape(-1)
                keep = max(1, self.max_values // len(batches))
                if x.numel() > keep:
                    pick = torch.randint(0, x.numel(), (keep,), generator=gen, device=gen.device)
                    x = x[pick.to(x.device)]
                collected[name].append(x)

            return fn

        with hooked(u.module.register_forward_hook(hook(u.name)) for u in units):
            for batch in batches:
                raw_call(model, batch)
        h_act = {name: histogram_entropy(torch.cat(xs), self.bins) for name, xs in collected.items()}
        h_w = {u.name: histogram_entropy(u.weight, self.bins) for u in units}
        mean_h = float(np.mean(list(h_act.values())))
        perturb = weight_perturbations(model, layers, options, quantizer)
        energy = {u.name: dot64(u.weight) for u in units}
        frame = pd.DataFrame(
            [
                {"layer": layer, "option": option, "weight_nsr": d / energy[layer] if energy[layer] > 0 else 0.0}
                for (layer, option), d in perturb.items()
            ]
        )
        frame["entropy"] = frame["layer"].map(h_act)
        frame["weight_entropy"] = frame["layer"].map(h_w)
        frame["damage"] = frame["weight_nsr"] * frame["entropy"].map(lambda h: math.pow(2.0, h - mean_h))
        return frame
