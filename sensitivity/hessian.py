"""HessianTrace (HAWQ-V2/V3): per-layer Hessian traces from shared whole-model Hessian-vector products."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import partial

import pandas as pd
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mpsearch.core import MpsearchError
from mpsearch.core.params import Interval, OneOf
from mpsearch.data import n_samples, split
from mpsearch.outputs import Objective, hooked, model_device
from sensitivity.base import Estimator, trainable_weights, weight_perturbations
from sensitivity.hutchinson import hutchinson, hutchpp, seeded_probes
from sensitivity.sums import dot64


def _rows(reference: torch.Tensor) -> int:
    return int(reference.shape[0]) if reference.dim() else 1


class HessianVectorProduct:
    """H v for the mean calibration loss w.r.t. ``params``, one micro-batch graph at a time.

    Each batch is cut into micro-batches of ``micro_batch`` samples (None: whole batches; "auto": one sample
    where the output has a row per token, else whole batches); each one's loss is
    weighted by its share of the batch's output rows, so the sum is the batch mean for row-mean losses (KL
    and cosine). Per micro-batch, the first-order gradients are built with their graph (attention on
    PyTorch's math SDPA kernel: the fused CPU/CUDA kernels have no double backward); a hook keeps only each
    gradient's place in the graph (a GradientEdge) and drops its values, so no whole-model gradient is held.
    Every product asked for is then a backward pass from those edges with the probe as their gradient.
    Memory: one micro-batch's double-backward graph, the probe, and the partial H v blocks in flight.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list,
        objective: Objective,
        params: list[nn.Parameter],
        micro_batch: int | str | None = None,
    ) -> None:
        self.model, self.objective, self.params = model, objective, params
        self.parts: list[tuple] = []  # (micro-batch, its reference output, weight of its loss)
        for batch in batches:
            chunks = [batch] if micro_batch in (None, "auto") else split(batch, micro_batch)
            refs = objective.references(model, chunks)
            if micro_batch == "auto" and _rows(refs[0]) > n_samples(batch) > 1:  # token rows: one sequence each
                chunks = split(batch, 1)
                refs = objective.references(model, chunks)
            rows = sum(_rows(r) for r in refs)
            self.parts += [(c, r, _rows(r) / rows / len(batches)) for c, r in zip(chunks, refs)]
        self.count = 0
        self.seconds = 0.0

    def _edges(self, chunk, reference, weight: float) -> list:
        """Per parameter, the GradientEdge of d(weight * loss)/d(param) in a graph kept for double backward
        (None where that gradient does not depend on any parameter: its block of H is zero)."""
        edges: list = [None] * len(self.params)

        def keep(i: int):
            def hook(param: torch.Tensor) -> None:
                if param.grad.grad_fn is not None:
                    edges[i] = get_gradient_edge(param.grad)
                param.grad = None  # the values are never needed, only their place in the graph

            return hook

        hooks = hooked(p.register_post_accumulate_grad_hook(keep(i)) for i, p in enumerate(self.params))
        with hooks, sdpa_kernel(SDPBackend.MATH), torch.enable_grad(), warnings.catch_warnings():
            # backward(create_graph=True) warns of a param <-> grad cycle: the hook breaks it (grad = None)
            warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True")
            loss = self.objective(self.model, chunk, reference) * weight
            torch.autograd.backward(loss, inputs=self.params, create_graph=True)
        return edges

    def _backward(self, edges: list, vs: list[torch.Tensor], on_block: Callable[[int, torch.Tensor], None]) -> None:
        """One product's blocks for one micro-batch: ``on_block(i, block)`` as soon as layer i's block of H v
        is complete, then the block is dropped."""

        def hand(i: int):
            def hook(param: torch.Tensor) -> None:
                on_block(i, param.grad)
                param.grad = None

            return hook

        roots = [i for i, e in enumerate(edges) if e is not None]
        if not roots:
            return
        with hooked(p.register_post_accumulate_grad_hook(hand(i)) for i, p in enumerate(self.params)):
            torch.autograd.backward(
                [edges[i] for i in roots],
                grad_tensors=[vs[i] for i in roots],
                inputs=self.params,
                retain_graph=True,
            )

    def _products(self, count: int, vectors: Callable[[int], list[torch.Tensor]], on_block) -> None:
        """``count`` products summed over micro-batches; product j takes probe ``vectors(j)`` (drawn once per
        micro-batch and freed before the next is drawn) and calls ``on_block(j, probe, i, block)``."""
        start = time.perf_counter()
        for chunk, reference, weight in self.parts:
            edges = self._edges(chunk, reference, weight)
            for j in range(count):
                vs = vectors(j)
                self._backward(edges, vs, partial(on_block, j, vs))
                del vs
            del edges
        self.count += count
        self.seconds += time.perf_counter() - start

    def __call__(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole product H v."""
        total = [torch.zeros_like(p) for p in self.params]

        def add(j: int, probe, i: int, block: torch.Tensor) -> None:
            total[i] += block

        self._products(1, lambda j: vs, add)
        return total

    def quad(self, probe: Callable[[int], list[torch.Tensor]], first: int, count: int) -> torch.Tensor:
        """(count, layers): v_i . (H v_i) restricted to each layer, for probes i = first .. first + count - 1;
        each layer's block of H v is dotted with the probe and dropped as soon as it is complete."""
        dots = torch.zeros(count, len(self.params), dtype=torch.float64, device="cpu")

        def dot(j: int, vs, i: int, block: torch.Tensor) -> None:
            dots[j, i] += dot64(vs[i], block)

        self._products(count, lambda j: probe(first + j), dot)
        return dots


class HessianTrace(Estimator):
    """damage = tr(H_l) / n_l * ||Q(W_l) - W_l||^2, traces from Hutchinson or Hutch++ probes.

    ``method``: "hutchinson" (Rademacher probes, adaptive: stops once every layer's relative standard error
    is below ``rtol``, between ``min_probes`` and ``max_probes``; probes come in rounds of ``round_size``
    that share one graph per micro-batch) or "hutchpp" (``sketch`` sketch vectors and ``max_probes`` residual
    probes). ``micro_batch``: samples per double-backward graph ("auto": one sequence for models whose output
    has a row per token, whose graph would otherwise hold several activation copies per token per layer;
    whole batches otherwise). The loss is the label-free loss against the full-precision output
    (KL or cosine), whose gradient vanishes at the full-precision weights, so its Hessian is the curvature
    that quantization noise meets. Columns: hessian_trace, hessian_trace_std, perturbation. After a run,
    ``stats_`` holds the number of products and their time.
    """

    name = "hessian"
    memory_hint = (
        "lower micro_batch (one micro-batch's double-backward graph is held; 1 = one sample) or use shorter "
        "sequences; "
        "with method='hutchpp', lower sketch or use method='hutchinson'"
    )
    _parameter_constraints = {
        "method": [OneOf(("hutchinson", "hutchpp"))],
        "min_probes": [Interval(int, 1)],
        "max_probes": [Interval(int, 1)],
        "rtol": [Interval(float, 0, open_low=True)],
        "sketch": [Interval(int, 1)],
        "round_size": [Interval(int, 1)],
        "micro_batch": [OneOf(("auto",)), Interval(int, 1), None],
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
        micro_batch: int | str | None = "auto",
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.method = method
        self.min_probes = min_probes
        self.max_probes = max_probes
        self.rtol = rtol
        self.sketch = sketch
        self.round_size = round_size
        self.micro_batch = micro_batch
        self.seed = seed
        self.progress = progress

    def _validate_more(self) -> None:
        if self.method == "hutchinson" and self.min_probes > self.max_probes:
            raise MpsearchError(
                f"estimator 'hessian': min_probes={self.min_probes} exceeds max_probes={self.max_probes}",
                "pass min_probes <= max_probes",
            )

    def _estimate(self, model, batches, layers, options, objective: Objective, quantizer):
        start = time.perf_counter()
        params = trainable_weights(model, layers)
        hvp = HessianVectorProduct(model, batches, objective, params, self.micro_batch)
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
        perturb = weight_perturbations(model, layers, options, quantizer)
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
