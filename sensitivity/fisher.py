"""Fisher (FIT-style): diagonal Fisher information from per-sample gradients -> sum F_i (Q(w_i) - w_i)^2."""

from __future__ import annotations

from itertools import chain

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.core import MpsearchError
from mpsearch.core.params import Interval
from mpsearch.data import n_samples, take
from mpsearch.outputs import Objective, hooked, model_device
from mpsearch.quant.quantizer import Quantizer
from sensitivity.base import NAN, Estimator, trainable_weights, units_for
from sensitivity.inputs import InputFisher
from sensitivity.sums import dot64, sum64


class Fisher(Estimator):
    """damage = 1/2 sum_i F_ii (Q(w_i) - w_i)^2 with F the Fisher diagonal of the model's own predictive
    distribution, from per-sample gradients.

    Targets come from the model's own predictive distribution (the "true" Fisher; the label-free loss has
    zero gradient at the full-precision weights, so the empirical Fisher of it would vanish):
    - logits (loss "kl"): a sample with one row and at most ``exact_classes`` classes takes the exact
      expectation (one gradient per class, weighted by its probability); otherwise ``n_targets`` draws, each
      drawing every row's class (every token of a sequence) from its own distribution. The gradient of a
      draw sums the rows' scores; their cross terms vanish in expectation, so its square estimates the sum
      of the rows' Fisher diagonals;
    - embeddings (loss "cosine"): ``n_targets`` Gaussian draws eps give scores J^T eps.
    Written as a per-sample autograd loop rather than torch.func ``vmap(grad)``: one forward per sample,
    one backward per draw through the retained graph; each layer's squared gradient is added to its float32
    accumulator by a post-accumulate-grad hook the moment it is ready and then dropped, so one layer's
    gradient is alive at a time (vmap materializes a whole chunk of per-sample gradients of every layer).
    Memory above the model: the float32 accumulators (1x an fp32 model's weights, 2x a bf16 one's) and one
    sample's graph. Columns: ``fisher`` (trace of
    the layer's Fisher diagonal), ``perturbation``. Uses up to ``max_samples`` samples, draws with ``seed``.
    With a GPTQ quantizer, ``cross_terms`` (default) counts each linear row's cross-column terms through its
    inputs' Hessian (``correlated_damage``); False: the diagonal alone.
    ``runtime_inputs`` (default): for options whose runtime rounds a matmul's input (llama.cpp's CPU backend:
    8 bits per block, ``Runtime.input_rounding``), add that rounding's damage, the Fisher quadratic form of
    the inputs' rounding error from the same draws (``sensitivity.inputs.InputFisher``; column
    ``input_damage``), so that a table of llama.cpp types ranks them as llama.cpp computes; False: the
    weights' error alone.
    """

    name = "fisher"
    memory_hint = "use shorter calibration samples (Fisher holds one sample's graph beside float32 accumulators)"
    _parameter_constraints = {
        "max_samples": [Interval(int, 1)],
        "n_targets": [Interval(int, 1)],
        "exact_classes": [Interval(int, 0)],
        "seed": [Interval(int, 0)],
        "cross_terms": [bool],
        "runtime_inputs": [bool],
        "progress": [bool],
    }

    def __init__(
        self,
        max_samples: int = 64,
        n_targets: int = 4,
        exact_classes: int = 16,
        seed: int = 0,
        cross_terms: bool = True,
        runtime_inputs: bool = True,
        progress: bool = True,
    ) -> None:
        self.max_samples = max_samples
        self.n_targets = n_targets
        self.exact_classes = exact_classes
        self.seed = seed
        self.cross_terms = cross_terms
        self.runtime_inputs = runtime_inputs
        self.progress = progress

    def _estimate(self, model: nn.Module, batches, layers, options, objective: Objective, quantizer: Quantizer):
        if objective.name not in ("kl", "cosine"):
            raise MpsearchError(
                "Fisher needs loss 'kl' (logits) or 'cosine' (embeddings)", "pass loss_fn='kl' or 'cosine'"
            )
        params = trainable_weights(model, layers)
        units = units_for(model, layers)
        gen = torch.Generator(device=model_device(model)).manual_seed(self.seed)
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        draw_weight = [0.0]

        def accumulate(acc: torch.Tensor):
            def hook(param: torch.Tensor) -> None:  # runs as soon as this layer's gradient is complete
                acc.addcmul_(param.grad.float(), param.grad.float(), value=draw_weight[0])
                param.grad = None  # one layer's gradient alive at a time

            return hook

        seen = 0
        total = min(self.max_samples, sum(n_samples(b) for b in batches))
        bar = tqdm(total=total, desc="fisher samples", disable=not self.progress, leave=False)
        inputs = InputFisher(units if self.runtime_inputs else [], options, quantizer)
        hooks = hooked(
            chain(
                (p.register_post_accumulate_grad_hook(accumulate(acc)) for p, acc in zip(params, fisher)),
                inputs.hooks(model),
            )
        )
        with hooks, bar:
            for batch in batches:
                for i in range(min(n_samples(batch), self.max_samples - seen)):
                    with torch.enable_grad():
                        out = objective.output(model, take(batch, i))
                        out = out.reshape(-1, out.shape[-1])  # rows: one per class vector / token / embedding
                        draws = self._draws(objective.name, out.detach(), gen)
                        if objective.name == "kl":  # one log-softmax in the graph, shared by the draws
                            logp = torch.log_softmax(out.float(), -1)
                        for j, (target, weight) in enumerate(draws):
                            if objective.name == "kl":
                                score = -logp.gather(-1, target[:, None]).sum()
                            else:
                                score = (out.float() * target).sum()
                            draw_weight[0] = inputs.weight = weight
                            torch.autograd.backward(
                                score, inputs=[*params, *inputs.leaves], retain_graph=j < len(draws) - 1
                            )
                    inputs.end_sample()
                    seen += 1
                    bar.update()
        rows = []
        with torch.no_grad():
            # every option quantized for every layer: minutes for llama.cpp's grid i-quants on a CPU, so a bar
            damage_bar = tqdm(
                zip(units, fisher), total=len(units), desc="fisher damage", disable=not self.progress, leave=False
            )
            for unit, f in damage_bar:
                f = f.div_(seen).t() if unit.type.transposed else f.div_(seen)  # the unit's (out, in) layout
                trace = sum64(f)
                h = quantizer.hessian(unit, shrunk=True) if self.cross_terms else None
                for opt in options:
                    if not quantizer.takes(unit, opt):  # no row in the table
                        rows.append({"layer": unit.name, "option": opt.name, "damage": NAN})
                        continue
                    d = quantizer.error(unit, opt)
                    weight_damage = 0.5 * (dot64(d, weight=f) if h is None else correlated_damage(d, f, h))
                    row = {"layer": unit.name, "option": opt.name, "fisher": trace, "perturbation": dot64(d)}
                    if inputs.by_option:
                        row["input_damage"] = inputs.damage(unit, opt, seen)
                    rows.append({**row, "damage": weight_damage + row.get("input_damage", 0.0)})
        return pd.DataFrame(rows)

    def _draws(self, kind: str, out: torch.Tensor, gen: torch.Generator) -> list[tuple[torch.Tensor, float]]:
        """(target, weight) pairs whose weighted squared score gradients average to the Fisher diagonal."""
        if kind == "kl":
            if out.shape[0] == 1 and out.shape[1] <= self.exact_classes:
                probs = torch.softmax(out.double(), -1)
                return [(torch.tensor([c], device=out.device), float(probs[0, c])) for c in range(out.shape[1])]
            probs = torch.softmax(out.float(), -1)  # one row per token: float32 (a float64 copy is 2x the logits)
            return [
                (torch.multinomial(probs, 1, generator=gen)[:, 0], 1.0 / self.n_targets) for _ in range(self.n_targets)
            ]
        return [
            (torch.randn(out.shape, generator=gen, device=out.device), 1.0 / self.n_targets)
            for _ in range(self.n_targets)
        ]


def correlated_damage(d: torch.Tensor, f: torch.Tensor, h: torch.Tensor) -> float:
    """sum_o (sum_i F_oi d_oi^2) (d_o H d_o^T) / (sum_i H_ii d_oi^2): the Fisher damage of a linear layer's
    error ``d`` (out, in) with its rows' cross-column terms, for GPTQ's errors, which are correlated by design.

    K-FAC factors a linear layer's Fisher as G (x) H, H = E[x x^T] the inputs' Hessian GPTQ quantizes
    against, so a row's damage is G_o d_o H d_o^T; G_o is estimated from the measured diagonal F_oi ~ G_o H_ii
    as the d^2-weighted ratio, which makes this the diagonal damage sum_i F_oi d_oi^2 when H is diagonal.
    The diagonal alone overrates GPTQ's error, whose columns cancel each other's effect on the output (the
    error GPTQ minimizes is d H d^T), by a factor that differs per layer and option. GPTQ fits d to the
    calibration tokens' H, though: with few tokens per input, d H d^T is far below what held-out inputs see
    (10x at half as many tokens as inputs), so the estimator passes H shrunk towards its diagonal as far as
    its off-diagonal is uncertain (``GPTQ.hessian(w, shrunk=True)``)."""
    total = 0.0
    for dc, fc in zip(d.reshape(d.shape[0], -1).split(4096), f.reshape(f.shape[0], -1).split(4096)):
        sq = dc.square()
        diag_f = (fc * sq).sum(1, dtype=torch.float64)
        quad = ((dc @ h) * dc).sum(1, dtype=torch.float64)
        diag_h = (sq * h.diagonal()).sum(1, dtype=torch.float64)
        ratio = torch.where(diag_h > 0, quad / diag_h.clamp(min=1e-300), torch.ones_like(quad))
        total += float((diag_f * ratio).sum())
    return total
