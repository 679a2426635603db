"""Relevance (LRP-QViT): each layer's share of the output relevance weights its quantization noise."""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.core import LayerInfo, Option
from mpsearch.outputs import LOSSES, Objective
from sensitivity.base import Estimator, trainable_weights, units_for
from sensitivity.sqnr import noise_ratios


def layer_relevance(
    model: nn.Module, batches: list, layer_names: list[str], score_fn, objective: Objective | None = None
) -> dict:
    """Relevance reaching each layer's output: sum over samples and neurons of |a * d score / d a|.

    Returns {"relevance": {layer: abs total}, "signed": {layer: signed total}, "score": total score}.
    ``score_fn(output, reference)`` is applied to the outputs reduced by ``objective``'s convention.
    ``model`` must be a private copy: its layers' weights are set to require gradients so that every
    layer output is part of the graph.

    This is LRP's z-rule (LRP-0) written as gradient x activation: for networks built from ReLU and
    bias-free linear maps the signed sum at every layer equals the output score (relevance conservation,
    tested). captum's LRP is not used because it has no rules for the zoo's attention, LayerNorm, GELU and
    swish blocks; this form runs on any model, and the signed totals show how far a model is from conservation.
    """
    modules = dict(model.named_modules())
    for name in layer_names:
        modules[name].weight.requires_grad_(True)  # puts every layer output on the graph
    acts: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(mod, inputs, output):
            acts.append((name, output))

        return fn

    objective = objective or Objective(LOSSES["kl"], "kl")
    reference = objective.references(model, batches)  # before the hooks
    handles = [modules[n].register_forward_hook(hook(n)) for n in layer_names]
    totals = {n: 0.0 for n in layer_names}
    signed = {n: 0.0 for n in layer_names}
    score_total = 0.0
    try:
        for batch, ref in zip(batches, reference):
            acts.clear()
            with torch.enable_grad():
                score = score_fn(objective.output(model, batch), ref)
                grads = torch.autograd.grad(score, [a for _, a in acts])  # no weight gradients are kept
            score_total += float(score.detach())
            for (n, a), g in zip(acts, grads):
                contrib = (a.detach() * g).double()
                totals[n] += float(contrib.abs().sum())
                signed[n] += float(contrib.sum())
            acts.clear()
    finally:
        for h in handles:
            h.remove()
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
    _parameter_constraints = {"progress": [bool]}

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def _estimate(
        self, model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], objective: Objective
    ):
        trainable_weights(model, layers)  # no other parameter needs a gradient
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
        frame = noise_ratios(model, batches, units, options, self.progress)[["layer", "option", "output_nsr"]]
        frame["relevance"] = frame["layer"].map(share)
        frame["damage"] = frame["relevance"] * frame["output_nsr"]
        return frame
