"""Relevance (LRP-QViT): each layer's share of the output relevance weights its quantization noise."""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.data import n_samples, take
from mpsearch.outputs import LOSSES, Objective, hooked, model_device
from mpsearch.quant.quantizer import Quantizer
from sensitivity.base import Estimator, units_for
from sensitivity.sqnr import noise_ratios
from sensitivity.sums import sum64


def layer_relevance(
    model: nn.Module, batches: list, layer_names: list[str], score_fn, objective: Objective | None = None
) -> dict:
    """Relevance reaching each layer's output: sum over samples and neurons of |a * d score / d a|.

    Returns {"relevance": {layer: abs total}, "signed": {layer: signed total}, "score": total score}.
    ``score_fn(output, reference)`` is applied to the outputs reduced by ``objective``'s convention, with the
    model's own (detached) output as the reference: the model explained is the full-precision one.

    This is LRP's z-rule (LRP-0) written as gradient x activation: for networks built from ReLU and
    bias-free linear maps the signed sum at every layer equals the output score (relevance conservation,
    tested). captum's LRP is not used because it has no rules for the zoo's attention, LayerNorm, GELU and
    swish blocks; this form runs on any model, and the signed totals show how far a model is from conservation.

    Memory: one zero scalar ``anchor`` that requires a gradient is added to every layer output, which puts
    the outputs on the graph without any weight needing a gradient (the graph keeps no inputs for weight
    gradients); a hook on each output takes its contribution the moment its gradient arrives, so no set of
    gradients of all layers is held; and batches go through one sample at a time (the score is a sum over
    samples), so what stays is one sample's graph and layer outputs.
    """
    modules = dict(model.named_modules())
    objective = objective or Objective(LOSSES["kl"], "kl")
    anchor = torch.zeros((), device=model_device(model), requires_grad=True)
    totals = {n: 0.0 for n in layer_names}
    signed = {n: 0.0 for n in layer_names}

    def hook(name):
        def fn(mod, inputs, output):
            out = output + anchor.to(output.device, output.dtype)  # same values, now on the graph
            value = out.detach()  # the hook must not hold ``out`` itself: a cycle would outlive the batch

            def take(grad: torch.Tensor) -> None:
                contrib = value.float() * grad.float()
                signed[name] += sum64(contrib)
                totals[name] += sum64(contrib.abs_())

            out.register_hook(take)
            return out

        return fn

    score_total = 0.0
    with hooked(modules[n].register_forward_hook(hook(n)) for n in layer_names):
        for sample in (take(batch, i) for batch in batches for i in range(n_samples(batch))):
            with torch.enable_grad():
                out = objective.output(model, sample)
                score = score_fn(out, out.detach())
                torch.autograd.grad(score, anchor, allow_unused=True)  # runs the hooks; keeps nothing
            score_total += float(score.detach())
            del out, score
    return {"relevance": totals, "signed": signed, "score": score_total}


def _score(kind: str):
    if kind == "cosine":
        return lambda out, ref: (out * ref).sum()  # projection on the full-precision embedding
    return lambda out, ref: out.gather(-1, ref.argmax(-1, keepdim=True)).sum()  # predicted-class logit


class Relevance(Estimator):
    """damage = relevance share of the layer x output noise-to-signal ratio of the option.

    The score explained is the logit of the full-precision prediction (classifiers) or the projection of the
    embedding on the full-precision embedding (loss "cosine"). Columns: ``relevance`` (share, sums to 1 over
    layers), ``output_nsr``. After a run, ``conservation_`` holds signed relevance / score per layer (1 = conserved).
    """

    name = "relevance"
    memory_hint = "use shorter calibration samples (relevance holds one sample's graph and layer outputs)"
    _parameter_constraints = {"progress": [bool]}

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def _estimate(self, model: nn.Module, batches, layers, options, objective: Objective, quantizer: Quantizer):
        units = units_for(model, layers)
        names = [n for u in units for n in u.names]  # a shared weight gathers the relevance of all its uses
        rel = layer_relevance(model, batches, names, _score(objective.name), objective)
        per_unit = {u.name: sum(rel["relevance"][n] for n in u.names) for u in units}
        total = sum(per_unit.values()) or 1.0
        share = {n: v / total for n, v in per_unit.items()}
        self.conservation_ = {
            u.name: sum(rel["signed"][n] for n in u.names) / rel["score"] if rel["score"] else float("nan")
            for u in units
        }
        frame = noise_ratios(model, batches, units, options, quantizer, self.progress)[
            ["layer", "option", "output_nsr"]
        ]
        frame["relevance"] = frame["layer"].map(share)
        frame["damage"] = frame["relevance"] * frame["output_nsr"]
        return frame
