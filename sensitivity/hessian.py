"""HessianTrace (HAWQ-V2/V3): per-layer Hessian traces from shared whole-model Hessian-vector products."""

from __future__ import annotations

import time

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.core import LayerInfo, MpsearchError
from mpsearch.data import call_model, outputs
from sensitivity.base import Estimator, LossFn, weight_perturbations
from sensitivity.hutchinson import hutchinson, hutchpp


class HessianVectorProduct:
    """H v for the mean calibration loss w.r.t. ``params``: one double backward per batch per product.

    First-order gradients (with their graphs) are built once and reused by every product.
    """

    def __init__(self, model: nn.Module, batches: list, loss_fn: LossFn, params: list[nn.Parameter]) -> None:
        self.params = params
        self.grads = []
        reference = outputs(model, batches)
        for batch, ref in zip(batches, reference):
            loss = loss_fn(call_model(model, batch), ref) / len(batches)
            self.grads.append(torch.autograd.grad(loss, params, create_graph=True))
        self.count = 0
        self.seconds = 0.0

    def __call__(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        start = time.perf_counter()
        total = [torch.zeros_like(p) for p in self.params]
        for grads in self.grads:
            dot = sum((g * v).sum() for g, v in zip(grads, vs))
            for acc, hv in zip(total, torch.autograd.grad(dot, self.params, retain_graph=True)):
                acc += hv
        self.count += 1
        self.seconds += time.perf_counter() - start
        return total


def trainable_weights(model: nn.Module, layers: list[LayerInfo]) -> list[nn.Parameter]:
    """Gradients only for the layers' weights (``model`` is the estimator's private copy)."""
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    params = []
    for info in layers:
        weight = modules[info.name].weight
        weight.requires_grad_(True)
        params.append(weight)
    return params


class HessianTrace(Estimator):
    """damage = tr(H_l) / n_l * ||Q(W_l) - W_l||^2, traces from Hutchinson or Hutch++ probes.

    ``method``: "hutchinson" (Rademacher probes, adaptive: stops once every layer's relative standard error
    is below ``rtol``, between ``min_probes`` and ``max_probes``) or "hutchpp" (``sketch`` sketch vectors
    and ``max_probes`` residual probes). The loss is the label-free loss against the full-precision output
    (KL or cosine), whose gradient vanishes at the full-precision weights, so its Hessian is the curvature
    that quantization noise meets. Columns: hessian_trace, hessian_trace_std, perturbation. After a run,
    ``stats_`` holds the number of products and their time.
    """

    name = "hessian"

    def __init__(
        self,
        method: str = "hutchinson",
        min_probes: int = 8,
        max_probes: int = 48,
        rtol: float = 0.1,
        sketch: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.method = method
        self.min_probes = min_probes
        self.max_probes = max_probes
        self.rtol = rtol
        self.sketch = sketch
        self.seed = seed
        self.progress = progress

    def _estimate(self, model, batches, layers, options, loss_fn):
        if self.method not in ("hutchinson", "hutchpp"):
            raise MpsearchError(f"unknown method {self.method!r}", "use 'hutchinson' or 'hutchpp'")
        start = time.perf_counter()
        params = trainable_weights(model, layers)
        hvp = HessianVectorProduct(model, batches, loss_fn, params)
        gen = torch.Generator().manual_seed(self.seed)
        shapes = [p.shape for p in params]
        total = self.max_probes if self.method == "hutchinson" else 3 * self.sketch + self.max_probes
        trace_start = time.perf_counter()
        with tqdm(total=total, desc="hessian probes", disable=not self.progress, leave=False) as bar:
            if self.method == "hutchinson":
                est = hutchinson(hvp, shapes, gen, self.min_probes, self.max_probes, self.rtol, bar.update)
            else:
                est = hutchpp(hvp, shapes, gen, self.sketch, self.max_probes, bar.update)
        trace_s = time.perf_counter() - trace_start
        perturb = weight_perturbations(model, layers, options)
        self.stats_ = {
            "hvps": hvp.count,
            "hvp_s": hvp.seconds,
            "trace_s": trace_s,
            "wall_s": time.perf_counter() - start,
        }
        rows = []
        for i, info in enumerate(layers):
            trace, std = float(est.trace[i]), float(est.stderr[i])
            for opt in options:
                d = perturb[info.name, opt.name]
                rows.append(
                    {
                        "layer": info.name,
                        "option": opt.name,
                        "damage": trace / info.n_params * d,
                        "damage_std": std / info.n_params * d,
                        "hessian_trace": trace,
                        "hessian_trace_std": std,
                        "perturbation": d,
                    }
                )
        return pd.DataFrame(rows)
