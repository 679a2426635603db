"""Relevance (LRP-QViT): each layer's share of the output relevance weights its quantization noise."""

from __future__ import annotations

import torch
from torch import nn

from mpsearch.core import LayerInfo, Option
from mpsearch.data import call_model, cosine_distance, outputs
from sensitivity.base import Estimator, LossFn
from sensitivity.sqnr import noise_ratios


def layer_relevance(model: nn.Module, batches: list, layer_names: list[str], score_fn) -> dict:
    """Relevance reaching each layer's output: sum over samples and neurons of |a * d score / d a|.

    Returns {"relevance": {layer: abs total}, "signed": {layer: signed total}, "score": total score}.
    ``model`` must be a private copy: its layers' weights are set to require gradients so that every
    layer output is part of the graph.

    This is LRP's z-rule (LRP-0) written as gradient x activation: for networks built from ReLU and
    bias-free linear maps the signed sum at every layer equals the output score (relevance conservation,
    tested). captum's LRP is not used because it has no rules for the zoo's attention, LayerNorm, GELU and
    swish blocks; this form runs on any model, and the signed totals show how far a model is from conservation.
    """
    modules = dict(model.named_modules())
    for name in layer_names:
        modules[name].weight.requires_grad_(True)
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}

    def hook(name):
        def fn(mod, inputs, output):
            output.retain_grad()
            acts[name].append(output)

        return fn

    reference = outputs(model, batches)  # before the hooks: they need a graph
    handles = [modules[n].register_forward_hook(hook(n)) for n in layer_names]
    totals = {n: 0.0 for n in layer_names}
    signed = {n: 0.0 for n in layer_names}
    score_total = 0.0
    try:
        for batch, ref in zip(batches, reference):
            for n in layer_names:
                acts[n].clear()
            with torch.enable_grad():
                score = score_fn(call_model(model, batch), ref)
                score.backward()
            score_total += float(score.detach())
            for n in layer_names:
                for a in acts[n]:
                    contrib = (a.detach() * a.grad).double()
                    totals[n] += float(contrib.abs().sum())
                    signed[n] += float(contrib.sum())
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

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def _estimate(
        self, model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], loss_fn: LossFn
    ):
        for p in model.parameters():
            p.requires_grad_(False)
        names = [i.name for i in layers]
        rel = layer_relevance(model, batches, names, _score("cosine" if loss_fn is cosine_distance else "kl"))
        total = sum(rel["relevance"].values()) or 1.0
        share = {n: v / total for n, v in rel["relevance"].items()}
        self.conservation_ = {n: rel["signed"][n] / rel["score"] if rel["score"] else float("nan") for n in names}
        frame = noise_ratios(model, batches, layers, options, self.progress)[["layer", "option", "output_nsr"]]
        frame["relevance"] = frame["layer"].map(share)
        frame["damage"] = frame["relevance"] * frame["output_nsr"]
        return frame
