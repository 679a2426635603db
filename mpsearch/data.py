"""Batches and calling conventions.

A batch is a tensor (``model(batch)``), a tuple/list of tensors (``model(*batch)``) or a dict of tensors
(``model(**batch)``). A loss function takes ``(output, reference)`` where ``reference`` is the
full-precision model's output on the same batch: every quality measure here is label-free.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from mpsearch.core import MpsearchError


def cache_root() -> Path:
    """Where trained zoo weights and cost tables are cached: $MPSEARCH_CACHE or ~/.cache/mpsearch."""
    return Path(os.environ.get("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch"))


def call_model(model: torch.nn.Module, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    raise MpsearchError(
        f"cannot call the model on a batch of type {type(batch).__name__}",
        "give batches as tensors, tuples of tensors or dicts of tensors",
    )


def as_batches(data: Iterable) -> list:
    """Materialize calibration data (it is iterated several times) and check it is not empty."""
    batches = list(data)
    if not batches:
        raise MpsearchError("calibration data is empty", "pass at least one batch")
    return batches


def _tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [batch[k] for k in sorted(batch)]
    return list(batch)


def hash_tensor(h, t: torch.Tensor, label: str = "") -> None:
    """Feed a tensor's name, shape, dtype and raw bytes into a hashlib object."""
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{label}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def data_fingerprint(batches: list) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for t in _tensors(batch):
            hash_tensor(h, t)
    return h.hexdigest()[:16]


@torch.no_grad()
def outputs(model: torch.nn.Module, batches: list) -> list[torch.Tensor]:
    return [call_model(model, b) for b in batches]


def kl_div(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || output) over samples, from logits (the last dim is the class dim)."""
    ref = torch.log_softmax(reference.float(), -1)
    out = torch.log_softmax(output.float(), -1)
    return (ref.exp() * (ref - out)).sum(-1).mean()


def cosine_distance(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cos(output, reference) over samples (embeddings on the last dim)."""
    return (1 - torch.nn.functional.cosine_similarity(output.float(), reference.float(), dim=-1)).mean()


LOSSES = {"kl": kl_div, "cosine": cosine_distance}
