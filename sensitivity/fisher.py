"""Fisher (FIT-style): diagonal Fisher information from per-sample gradients -> sum F_i (Q(w_i) - w_i)^2."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from mpsearch.core import LayerInfo, MpsearchError, Option
from mpsearch.data import cosine_distance, kl_div, outputs
from mpsearch.quant import quantize_weight
from sensitivity.base import Estimator, LossFn


def _take(batch, i: slice | int | torch.Tensor):
    if isinstance(batch, torch.Tensor):
        return batch[i]
    if isinstance(batch, dict):
        return {k: v[i] for k, v in batch.items()}
    return type(batch)(t[i] for t in batch)


def _n_samples(batch) -> int:
    first = (
        batch if isinstance(batch, torch.Tensor) else next(iter(batch.values() if isinstance(batch, dict) else batch))
    )
    return int(first.shape[0])


def _call(model, params, batch):
    if isinstance(batch, torch.Tensor):
        return functional_call(model, params, (batch,))
    if isinstance(batch, dict):
        return functional_call(model, params, (), batch)
    return functional_call(model, params, tuple(batch))


class Fisher(Estimator):
    """damage = 1/2 sum_i F_ii (Q(w_i) - w_i)^2 with F the Fisher diagonal of the model's own predictive
    distribution, estimated from per-sample gradients (torch.func ``vmap(grad)``; a per-sample autograd loop
    when the model does not vmap).

    Targets come from the model's own predictive distribution (the "true" Fisher; the label-free loss has
    zero gradient at the full-precision weights, so the empirical Fisher of it would vanish). For logits (loss
    "kl") with at most ``exact_classes`` classes the expectation over classes is taken exactly (one gradient
    per class, weighted by its probability); with more classes ``n_targets`` classes are drawn per sample with
    ``seed``. For embeddings (loss "cosine") ``n_targets`` Gaussian draws eps give scores J^T eps. Columns:
    ``fisher`` (trace of the layer's Fisher diagonal), ``perturbation``. Uses up to ``max_samples`` samples.
    """

    name = "fisher"

    def __init__(
        self,
        max_samples: int = 64,
        n_targets: int = 4,
        exact_classes: int = 16,
        chunk_size: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.max_samples = max_samples
        self.n_targets = n_targets
        self.exact_classes = exact_classes
        self.chunk_size = chunk_size
        self.seed = seed
        self.progress = progress

    def _estimate(
        self, model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], loss_fn: LossFn
    ):
        if loss_fn is kl_div:
            kind = "kl"
        elif loss_fn is cosine_distance:
            kind = "cosine"
        else:
            raise MpsearchError(
                "Fisher needs loss 'kl' (logits) or 'cosine' (embeddings)", "pass loss_fn='kl' or 'cosine'"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        weights = {f"{info.name}.weight": model.get_submodule(info.name).weight for info in layers}
        gen = torch.Generator().manual_seed(self.seed)
        fisher = {k: torch.zeros_like(w, dtype=torch.float64) for k, w in weights.items()}
        seen = 0
        reference = outputs(model, batches)

        def score(params, sample, target):
            out = _call(model, params, _unsqueeze(sample))[0]
            if kind == "kl":
                return -torch.log_softmax(out, -1)[target]
            return (out * target).sum()

        per_sample = vmap(grad(score), in_dims=(None, 0, 0), chunk_size=self.chunk_size)
        bar = tqdm(total=self.max_samples, desc="fisher samples", disable=not self.progress, leave=False)
        for batch, ref in zip(batches, reference):
            n = min(_n_samples(batch), self.max_samples - seen)
            if n <= 0:
                break
            batch, ref = _take(batch, slice(0, n)), ref[:n]
            repeat, targets, weight = self._targets(kind, ref, gen)
            samples = _take(batch, torch.arange(n).repeat_interleave(repeat))
            try:
                grads = per_sample(weights, samples, targets)
            except RuntimeError:  # models that do not vmap: same quantity, one sample at a time
                grads = self._loop(score, weights, samples, targets, n * repeat)
            for k, g in grads.items():
                fisher[k] += (g.double().pow(2) * weight.view(-1, *[1] * (g.dim() - 1))).sum(0)
            seen += n
            bar.update(n)
        bar.close()
        rows = []
        with torch.no_grad():
            for info in layers:
                key = f"{info.name}.weight"
                f = fisher[key] / seen
                w = weights[key]
                for opt in options:
                    d = (quantize_weight(w, opt) - w).double().pow(2)
                    rows.append(
                        {
                            "layer": info.name,
                            "option": opt.name,
                            "damage": 0.5 * float((f * d).sum()),
                            "fisher": float(f.sum()),
                            "perturbation": float(d.sum()),
                        }
                    )
        return pd.DataFrame(rows)

    def _targets(self, kind: str, ref: torch.Tensor, gen: torch.Generator):
        """(targets per sample, flat targets, weight of each (sample, target) pair) for one batch."""
        n = ref.shape[0]
        if kind == "kl":
            probs = torch.softmax(ref.double(), -1)
            n_classes = probs.shape[-1]
            if n_classes <= self.exact_classes:
                return n_classes, torch.arange(n_classes).repeat(n), probs.reshape(-1)
            drawn = torch.multinomial(probs.float(), self.n_targets, replacement=True, generator=gen)
            return self.n_targets, drawn.reshape(-1), torch.full((n * self.n_targets,), 1.0 / self.n_targets)
        eps = torch.randn((n * self.n_targets, *ref.shape[1:]), generator=gen)
        return self.n_targets, eps, torch.full((n * self.n_targets,), 1.0 / self.n_targets)

    @staticmethod
    def _loop(score, weights, batch, targets, n):
        out = {k: [] for k in weights}
        g_fn = grad(score)
        for i in range(n):
            g = g_fn(weights, _take(batch, i), targets[i])
            for k in out:
                out[k].append(g[k])
        return {k: torch.stack(v) for k, v in out.items()}


def _unsqueeze(sample):
    if isinstance(sample, torch.Tensor):
        return sample.unsqueeze(0)
    if isinstance(sample, dict):
        return {k: v.unsqueeze(0) for k, v in sample.items()}
    return type(sample)(t.unsqueeze(0) for t in sample)
