"""HessianTrace (HAWQ-V2/V3): per-layer Hessian traces from shared whole-model Hessian-vector products."""

from __future__ import annotations

import time

import pandas as pd
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mpsearch.core import MpsearchError
from mpsearch.core.params import Interval, OneOf
from mpsearch.outputs import Objective, model_device
from sensitivity.base import Estimator, trainable_weights, weight_perturbations
from sensitivity.hutchinson import hutchinson, hutchpp, seeded_probes
from sensitivity.sums import dot64


class HessianVectorProduct:
    """H v for the mean calibration loss w.r.t. ``params``, batch by batch.

    Per batch, the first-order gradients are built with their graph (attention on PyTorch's math SDPA
    kernel: the fused CPU/CUDA kernels have no double backward), used for every product asked at once, and
    freed before the next batch: memory holds one batch's graph, never all of them. ``quad`` gives only the
    per-layer v . (H v) of each probe, so whole products are never accumulated for Hutchinson.
    """

    def __init__(self, model: nn.Module, batches: list, objective: Objective, params: list[nn.Parameter]) -> None:
        self.model, self.batches, self.objective, self.params = model, batches, objective, params
        self.references = objective.references(model, batches)
        self.count = 0
        self.seconds = 0.0

    def _per_batch(self, use) -> None:
        """Call ``use(grads)`` with each batch's first-order gradients (graph kept for double backward)."""
        start = time.perf_counter()
        for batch, ref in zip(self.batches, self.references):
            with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
                loss = self.objective(self.model, batch, ref) / len(self.batches)
                grads = torch.autograd.grad(loss, self.params, create_graph=True)
            use(grads)
            del loss, grads
        self.seconds += time.perf_counter() - start

    def _hv(self, grads, vs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, self.params, retain_graph=True)

    def __call__(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole product H v."""
        total = [torch.zeros_like(p) for p in self.params]

        def use(grads):
            for acc, hv in zip(total, self._hv(grads, vs)):
                acc += hv

        self._per_batch(use)
        self.count += 1
        return total

    def quad(self, probe, first: int, count: int) -> torch.Tensor:
        """(count, layers): v_i . (H v_i) restricted to each layer, for probes i = first .. first + count - 1.

        The second backward hands each layer's block of H v to a post-accumulate-grad hook that takes its dot
        with the probe and drops it: one layer's block of the product is alive at a time, never all of H v."""
        dots = torch.zeros(count, len(self.params), dtype=torch.float64, device="cpu")
        current: list = [None, None]  # (probe blocks, row of dots) of the product under way

        def take(i: int):
            def hook(param: torch.Tensor) -> None:
                current[1][i] += dot64(current[0][i], param.grad)
                param.grad = None

            return hook

        def use(grads):
            for j in range(count):
                current[0], current[1] = probe(first + j), dots[j]
                dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, current[0]))
                torch.autograd.backward(dot, inputs=self.params, retain_graph=True)
                del dot  # frees this probe's blocks (its graph holds them) before the next probe is drawn
                current[0] = None

        handles = [p.register_post_accumulate_grad_hook(take(i)) for i, p in enumerate(self.params)]
        try:
            self._per_batch(use)
        finally:
            for h in handles:
                h.remove()
        self.count += count
        return dots


class HessianTrace(Estimator):
    """damage = tr(H_l) / n_l * ||Q(W_l) - W_l||^2, traces from Hutchinson or Hutch++ probes.

    ``method``: "hutchinson" (Rademacher probes, adaptive: stops once every layer's relative standard error
    is below ``rtol``, between ``min_probes`` and ``max_probes``; probes come in rounds of ``round_size``
    that share one graph per batch) or "hutchpp" (``sketch`` sketch vectors and ``max_probes`` residual
    probes). The loss is the label-free loss against the full-precision output
    (KL or cosine), whose gradient vanishes at the full-precision weights, so its Hessian is the curvature
    that quantization noise meets. Columns: hessian_trace, hessian_trace_std, perturbation. After a run,
    ``stats_`` holds the number of products and their time.
    """

    name = "hessian"
    memory_hint = (
        "use smaller calibration batches (one batch's double-backward graph is held); "
        "with method='hutchpp', lower sketch or use method='hutchinson'"
    )
    _parameter_constraints = {
        "method": [OneOf(("hutchinson", "hutchpp"))],
        "min_probes": [Interval(int, 1)],
        "max_probes": [Interval(int, 1)],
        "rtol": [Interval(float, 0, open_low=True)],
        "sketch": [Interval(int, 1)],
        "round_size": [Interval(int, 1)],
        "seed": [Interval(int, 0)],
        "progress": [bool],
    }

    def __init__(
        self,
        method: str = "hutchinson",
        min_probes: int = 8,
        max_probes: int = 48,
        rtol: float = 0.1,
        sketch: int = 8,
        round_size: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.method = method
        self.min_probes = min_probes
        self.max_probes = max_probes
        self.rtol = rtol
        self.sketch = sketch
        self.round_size = round_size
        self.seed = seed
        self.progress = progress

    def _validate_more(self) -> None:
        if self.method == "hutchinson" and self.min_probes > self.max_probes:
            raise MpsearchError(
                f"estimator 'hessian': min_probes={self.min_probes} exceeds max_probes={self.max_probes}",
                "pass min_probes <= max_probes",
            )

    def _estimate(self, model, batches, layers, options, objective: Objective):
        start = time.perf_counter()
        params = trainable_weights(model, layers)
        hvp = HessianVectorProduct(model, batches, objective, params)
        shapes = [p.shape for p in params]
        total = self.max_probes if self.method == "hutchinson" else 3 * self.sketch + self.max_probes
        trace_start = time.perf_counter()
        with tqdm(total=total, desc="hessian probes", disable=not self.progress, leave=False) as bar:
            if self.method == "hutchinson":
                probe = seeded_probes(shapes, self.seed, model_device(model), params[0].dtype)
                quad = lambda first, count: hvp.quad(probe, first, count)  # noqa: E731
                est = hutchinson(quad, self.min_probes, self.max_probes, self.rtol, bar.update, self.round_size)
            else:
                gen = torch.Generator(device=model_device(model)).manual_seed(self.seed)
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
            # the label-free loss sits at its minimum (zero gradient), where H is positive semi-definite and
            # every block trace >= 0: a negative estimate is probe noise, not a layer that gains from noise
            curvature = max(trace, 0.0)
            for opt in options:
                d = perturb[info.name, opt.name]
                rows.append(
                    {
                        "layer": info.name,
                        "option": opt.name,
                        "damage": curvature / info.n_params * d,
                        "damage_std": std / info.n_params * d,
                        "hessian_trace": trace,
                        "hessian_trace_std": std,
                        "perturbation": d,
                    }
                )
        return pd.DataFrame(rows)
