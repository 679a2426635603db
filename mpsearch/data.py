"""Calibration data: materializing batches, fingerprints, and the cache location.

How a batch is fed to a model and how its output is reduced for a loss: ``mpsearch.outputs``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from mpsearch.core import MpsearchError


def cache_root() -> Path:
    """Where trained zoo weights and cost tables are cached: $MPSEARCH_CACHE or ~/.cache/mpsearch. A path that
    exists but is not a directory is a one-line error at once (files under it could never be made)."""
    root = Path(os.environ.get("MPSEARCH_CACHE", Path.home() / ".cache" / "mpsearch"))
    if root.exists() and not root.is_dir():
        raise MpsearchError(
            f"the cache path {root} is a file, not a directory", "point MPSEARCH_CACHE at a directory, or unset it"
        )
    return root


def as_batches(data: Iterable) -> list:
    """Materialize calibration data (it is iterated several times) and check it is not empty."""
    if isinstance(data, torch.Tensor | Mapping):
        raise MpsearchError(
            f"calibration data is one {type(data).__name__}, not an iterable of batches", "wrap it in a list: [batch]"
        )
    batches = list(data)
    if not batches:
        raise MpsearchError("calibration data is empty", "pass at least one batch")
    return batches


def _tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [batch[k] for k in sorted(batch) if isinstance(batch[k], torch.Tensor)]
    return [t for t in batch if isinstance(t, torch.Tensor)]


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


def n_samples(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    first = next(v for v in (batch.values() if isinstance(batch, Mapping) else batch) if isinstance(v, torch.Tensor))
    return int(first.shape[0])


def take(batch, i: int, count: int = 1):
    """Samples ``i .. i + count - 1`` of a batch, keeping the batch dimension (non-tensor entries pass through)."""
    pick = lambda t: t[i : i + count] if isinstance(t, torch.Tensor) else t  # noqa: E731
    if isinstance(batch, torch.Tensor):
        return pick(batch)
    if isinstance(batch, Mapping):
        return {k: pick(v) for k, v in batch.items()}
    return type(batch)(pick(t) for t in batch)


def split(batch, size: int) -> list:
    """The batch cut into consecutive micro-batches of ``size`` samples (the last may be smaller)."""
    n = n_samples(batch)
    return [batch] if size >= n else [take(batch, i, size) for i in range(0, n, size)]
