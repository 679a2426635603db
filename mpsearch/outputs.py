"""The output convention: what a model returns -> the tensor every loss, estimator and evaluation compares.

A batch is a tensor (``model(batch)``), a tuple/list of tensors (``model(*batch)``) or a dict of tensors
(``model(**batch)``, the Hugging Face way); it is moved to the model's device. The raw output is reduced to
one tensor whose rows are the units a loss averages over:

- a ``ModelOutput``/dict with ``logits`` -> the logits; ``sentence_embedding`` -> it; ``last_hidden_state``
  (an encoder) -> its mean over tokens, padding excluded (sentence-transformers' pooling); a tuple -> [0];
- sequence outputs (N, T, D) become token rows (M, D): with the batch's ``attention_mask`` only real tokens
  are kept, so padding never counts in a token-level KL.

``output_fn(output, batch) -> Tensor`` replaces this reduction. Losses take ``(output, reference)`` where
``reference`` is the full-precision model's reduced output on the same batch: quality is label-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpsearch.core import MpsearchError

OutputFn = Callable[[Any, Any], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(t, device) for t in batch)
    return batch


@contextmanager
def hooked(handles: Iterable) -> Iterator[list]:
    """Hooks registered by iterating ``handles`` (e.g. a generator of ``register_forward_hook`` calls), all
    removed on exit, also when the block or a registration raises: the one place hooks are put on and taken
    off the caller's model."""
    made: list = []
    try:
        for handle in handles:
            made.append(handle)
        yield made
    finally:
        for handle in made:
            handle.remove()


@contextmanager
def evaluating(model: nn.Module):
    """Run a model in eval mode (no dropout, no BatchNorm statistics updates), then restore every
    module's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def raw_call(model: nn.Module, batch):
    """Call the model on a batch (moved to the model's device); returns what the model returns."""
    batch = to_device(batch, model_device(model))
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(batch) if takes_one_dict(model, batch) else model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    raise MpsearchError(
        f"cannot call the model on a batch of type {type(batch).__name__}",
        "give batches as tensors, tuples of tensors or dicts of tensors",
    )


def takes_one_dict(model: nn.Module, batch: Mapping) -> bool:
    """Whether the model's forward takes the batch as ONE dict (a sentence-transformers ``SentenceTransformer``:
    ``forward(input: dict)``) rather than as keyword arguments (transformers models)."""
    import inspect

    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return False
    try:
        sig.bind(**batch)
        return False
    except TypeError:
        pass
    try:
        sig.bind(batch)
        return True
    except TypeError:
        return False


def attention_mask(batch) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def select(output) -> tuple[torch.Tensor, str]:
    """(tensor, kind): kind is "logits", "embedding", "hidden" (per-token states to pool) or "tensor"."""
    if isinstance(output, torch.Tensor):
        return output, "tensor"
    if isinstance(output, Mapping):  # transformers' ModelOutput is an OrderedDict
        for key, kind in (("logits", "logits"), ("sentence_embedding", "embedding"), ("last_hidden_state", "hidden")):
            if isinstance(output.get(key), torch.Tensor):
                return output[key], kind
        keys = sorted(k for k, v in output.items() if v is not None)
    elif isinstance(output, tuple | list) and output:
        return select(output[0])
    else:
        keys = []
    raise MpsearchError(
        f"cannot reduce a model output of type {type(output).__name__} (keys {keys}) to one tensor",
        "return a tensor, logits, sentence_embedding or last_hidden_state, or pass output_fn=(output, batch) -> tensor",
    )


def reduce_output(output, batch, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The tensor losses compare (see the module docstring)."""
    if output_fn is not None:
        out = output_fn(output, batch)
        if not isinstance(out, torch.Tensor):
            raise MpsearchError(
                f"output_fn returned a {type(out).__name__}, not a tensor", "make output_fn return a torch.Tensor"
            )
        return out
    tensor, kind = select(output)
    mask = attention_mask(batch)
    if mask is not None:
        mask = mask.to(tensor.device)
    if kind == "hidden":
        if tensor.dim() != 3:
            return tensor
        weights = torch.ones(tensor.shape[:2], device=tensor.device) if mask is None else mask.to(tensor.dtype)
        return (tensor * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-9)
    if tensor.dim() == 3:  # a sequence: token rows
        if mask is not None and tuple(mask.shape) == tuple(tensor.shape[:2]):
            return tensor[mask.bool()]
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor


def kl_div(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || output) over rows (samples or tokens), from logits on the last dim."""
    ref = torch.log_softmax(reference.float(), -1)
    out = torch.log_softmax(output.float(), -1)
    return (ref.exp() * (ref - out)).sum(-1).mean()


def cosine_distance(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cos(output, reference) over rows (embeddings on the last dim)."""
    return (1 - torch.nn.functional.cosine_similarity(output.float(), reference.float(), dim=-1)).mean()


LOSSES: dict[str, LossFn] = {"kl": kl_div, "cosine": cosine_distance}
DEFAULT_LOSS = {"logits": "kl", "tensor": "kl", "embedding": "cosine", "hidden": "cosine"}


@dataclass
class Objective:
    """A loss together with the output convention: ``objective(model, batch, reference)`` is a scalar."""

    loss: LossFn
    name: str  # "kl", "cosine" or the custom loss's name
    output_fn: OutputFn | None = None

    def output(self, model: nn.Module, batch) -> torch.Tensor:
        return reduce_output(raw_call(model, batch), batch, self.output_fn)

    @torch.no_grad()
    def references(self, model: nn.Module, batches: list) -> list[torch.Tensor]:
        return [self.output(model, b).detach() for b in batches]

    def __call__(self, model: nn.Module, batch, reference: torch.Tensor) -> torch.Tensor:
        return self.loss(self.output(model, batch), reference)

    @torch.no_grad()
    def losses(self, model: nn.Module, batches: list, references: list[torch.Tensor]) -> list[float]:
        """The loss on each batch."""
        return [float(self(model, b, r)) for b, r in zip(batches, references)]

    def mean(self, model: nn.Module, batches: list, references: list[torch.Tensor]) -> float:
        return sum(self.losses(model, batches, references)) / len(batches)


def resolve_objective(loss_fn, output_fn: OutputFn | None, model: nn.Module | None = None, batch=None) -> Objective:
    """``loss_fn``: None (KL for logits, cosine for embeddings: decided from the model's output on ``batch``),
    a name from LOSSES, or a callable(output, reference) -> scalar."""
    if output_fn is not None and not callable(output_fn):
        raise MpsearchError(f"output_fn {output_fn!r} is not callable", "pass f(output, batch) -> tensor")
    if loss_fn is None:
        name = "kl"
        if model is not None and batch is not None and output_fn is None:
            with torch.no_grad():
                name = DEFAULT_LOSS[select(raw_call(model, batch))[1]]
        return Objective(LOSSES[name], name, output_fn)
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise MpsearchError(f"unknown loss {loss_fn!r}", f"use one of {sorted(LOSSES)} or a callable")
        return Objective(LOSSES[loss_fn], loss_fn, output_fn)
    if not callable(loss_fn):
        raise MpsearchError(f"loss_fn {loss_fn!r} is not callable", "pass f(output, reference) -> scalar tensor")
    return Objective(loss_fn, getattr(loss_fn, "__name__", "custom"), output_fn)


# ---------------------------------------------------------------- perplexity (causal LMs)
def is_causal_lm(model: nn.Module) -> bool:
    """A transformers model that generates text left to right (``...ForCausalLM``)."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return bool(
        callable(can_generate)
        and can_generate()
        and config is not None
        and not getattr(config, "is_encoder_decoder", False)
    )


def metric_of(model: nn.Module, loss_name: str, output_fn: OutputFn | None = None) -> tuple[str, bool]:
    """(name, higher is better) of the metric ``mpsearch.evaluate`` reports for this model and loss:
    perplexity for causal LMs, else -KL ("neg_kl") or mean cosine similarity ("cosine")."""
    if output_fn is None and is_causal_lm(model):
        return "perplexity", False
    return ("neg_kl", True) if loss_name == "kl" else ("cosine", True)


def _input_ids(batch) -> torch.Tensor:
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"]
    if isinstance(batch, torch.Tensor) and batch.dim() == 2 and not batch.is_floating_point():
        return batch
    raise MpsearchError(
        "perplexity needs token ids: a tensor (N, T) of ids or a dict with 'input_ids'",
        "pass tokenized text batches",
    )


@torch.no_grad()
def nll_sum(output, batch) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, number of predicted tokens) of a causal LM's raw output on
    one batch; padding excluded."""
    logits, _ = select(output)
    ids = _input_ids(batch).to(logits.device)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise MpsearchError(
            f"perplexity needs logits (N, T, V) for ids {tuple(ids.shape)}, got {tuple(logits.shape)}",
            "evaluate a causal language model, or use loss 'kl'",
        )
    mask = attention_mask(batch)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()
    keep = keep[:, 1:] & keep[:, :-1]
    logp = torch.log_softmax(logits[:, :-1][keep].float(), -1)
    target = ids[:, 1:][keep]
    return float(-logp.gather(-1, target[:, None]).double().sum()), int(keep.sum())


def perplexity(model: nn.Module, batches: list) -> float:
    """exp(mean next-token NLL) over every real token of the batches."""
    total, count = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            s, n = nll_sum(raw_call(model, batch), batch)
        total, count = total + s, count + n
    if count == 0:
        raise MpsearchError("no tokens to predict in the evaluation data", "give sequences of at least 2 tokens")
    return math.exp(total / count)
