"""Calibration data: materializing batches, fingerprints, and the cache location.

How a batch is fed to a model and how its output is reduced for a loss: ``mpsearch.outputs``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
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


LOG = logging.getLogger("mpsearch")
_UNWRITABLE: set = set()  # cache folders already reported as unwritable (said once per process)


def write_atomic(path: Path, content: str | Callable[[Path], object]) -> None:
    """Write ``content`` (text, or a function writing a file at the path it is given) to ``path`` through a
    temp file renamed over it: a crash or a fault never leaves a half-written file where a reader looks."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # gone after the rename; a half-written one after a fault


def store_in_cache(path: Path, content: str | Callable[[Path], object]) -> None:
    """``write_atomic`` into the cache; a cache that cannot be written (read-only, full, not a folder) is said
    once, and the work goes on without it. (``torch.save`` reports such faults as RuntimeError.)"""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, content)
    except (OSError, RuntimeError) as err:
        if path.parent not in _UNWRITABLE:
            _UNWRITABLE.add(path.parent)
            LOG.warning("mpsearch: cannot write the cache %s (%s); going on without caching", path.parent, err)


TEXT_BATCH = 8  # strings per batch when a tokenizer turns a list of strings into batches


def as_batches(data: Iterable, tokenizer=None) -> list:
    """Materialize calibration data (it is iterated several times) and check it is not empty. A list of
    strings with ``tokenizer`` (a transformers tokenizer, or any callable from a list of strings to a dict of
    tensors, e.g. a SentenceTransformer's ``tokenize``) becomes batches of ``TEXT_BATCH`` strings, padded."""
    if isinstance(data, torch.Tensor | Mapping | str):
        raise MpsearchError(
            f"calibration data is one {type(data).__name__}, not an iterable of batches", "wrap it in a list: [batch]"
        )
    batches = list(data)
    if tokenizer is not None:
        batches = tokenize_texts(batches, tokenizer)
    if not batches:
        raise MpsearchError("calibration data is empty", "pass at least one batch")
    for i, batch in enumerate(batches):  # what a model can be called with: tensors, somewhere in the batch
        leaves = [v for _, v in _leaves(batch)]
        if any(isinstance(v, torch.Tensor) for v in leaves):
            continue
        if any(isinstance(v, str) for v in leaves):
            raise MpsearchError(
                f"calibration batch {i} is text ({type(batch).__name__} of str), not tensors",
                "pass tokenizer= (the model's tokenizer) with a list of strings, or use the CLI's --calib FILE",
            )
        kind = next((type(v).__name__ for v in leaves if type(v).__module__ == "numpy"), type(batch).__name__)
        raise MpsearchError(
            f"calibration batch {i} holds no tensor (a {kind})", "pass torch tensors (torch.from_numpy(array))"
        )
    return batches


def tokenize_texts(texts: list, tokenizer) -> list[dict]:
    """Batches of ``TEXT_BATCH`` strings through ``tokenizer`` (see ``as_batches``)."""
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise MpsearchError(
            f"tokenizer= is given, but item {bad} of the data is a {type(texts[bad]).__name__}, not a string",
            "pass a list of strings with tokenizer=, or batches of tensors without it",
        )
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # no transformers: a plain callable
        PreTrainedTokenizerBase = ()  # noqa: N806
    out = []
    for i in range(0, len(texts), TEXT_BATCH):
        chunk = texts[i : i + TEXT_BATCH]
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True)
        else:
            batch = tokenizer(chunk)
        if not isinstance(batch, Mapping) or not any(isinstance(v, torch.Tensor) for v in batch.values()):
            raise MpsearchError(
                f"tokenizer returned a {type(batch).__name__}, not a dict of tensors",
                "pass a transformers tokenizer, or a callable returning one (e.g. SentenceTransformer.tokenize)",
            )
        out.append(dict(batch))
    return out


def _leaves(batch, label: str = "") -> Iterator[tuple[str, object]]:
    """(path, value) of every leaf of a batch: tensors and other values inside tensors, tuples, lists and dicts
    (keys sorted), nested to any depth, so two batches of the same form differ here whenever their data does."""
    if isinstance(batch, Mapping):
        for key in sorted(batch, key=str):
            yield from _leaves(batch[key], f"{label}.{key}")
    elif isinstance(batch, tuple | list):
        for i, item in enumerate(batch):
            yield from _leaves(item, f"{label}[{i}]")
    else:
        yield label, batch


def _tensors(batch) -> list[torch.Tensor]:
    return [v for _, v in _leaves(batch) if isinstance(v, torch.Tensor)]


def hash_tensor(h, t: torch.Tensor, label: str = "") -> None:
    """Feed a tensor's name, shape, dtype and raw bytes into a hashlib object."""
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{label}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def data_fingerprint(batches: list) -> str:
    """Hash of every leaf of every batch (tensors by shape, dtype and bytes; other values by their repr), with
    its place in the batch, so that no two different calibration sets share one."""
    h = hashlib.sha256()
    for i, batch in enumerate(batches):
        for label, value in _leaves(batch, f"{i}"):
            if isinstance(value, torch.Tensor):
                hash_tensor(h, value, label)
            else:
                h.update(f"{label}={value!r}".encode())
    return h.hexdigest()[:16]


def n_samples(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    tensors = _tensors(batch)
    if not tensors:
        raise MpsearchError(
            f"a calibration batch ({type(batch).__name__}) holds no tensor",
            "pass batches of tensors (a tokenizer's output with return_tensors='pt', a tensor, or a tuple of them)",
        )
    return int(tensors[0].shape[0])


def take(batch, i: int, count: int = 1):
    """Samples ``i .. i + count - 1`` of a batch, keeping the batch dimension, at any depth (a tuple holding a
    dict too); non-tensor entries pass through."""
    if isinstance(batch, torch.Tensor):
        return batch[i : i + count]
    if isinstance(batch, Mapping):
        return {k: take(v, i, count) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(take(t, i, count) for t in batch)
    return batch


def split(batch, size: int) -> list:
    """The batch cut into consecutive micro-batches of ``size`` samples (the last may be smaller)."""
    n = n_samples(batch)
    return [batch] if size >= n else [take(batch, i, size) for i in range(0, n, size)]
