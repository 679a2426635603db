"""Estimator base class: shared plumbing for every sensitivity estimator."""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import platform
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mpsearch.core import DEFAULT_OPTIONS, CostTable, LayerInfo, MpsearchError, Option, cost_rows, parse_options
from mpsearch.data import LOSSES, as_batches, cache_root, data_fingerprint
from mpsearch.layers import discover, model_fingerprint
from mpsearch.quant import quantize_weight

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_loss(loss_fn: str | LossFn | None) -> LossFn:
    """None -> KL of logits; a name from mpsearch.data.LOSSES; or a callable(output, reference)."""
    if loss_fn is None:
        return LOSSES["kl"]
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise MpsearchError(f"unknown loss {loss_fn!r}", f"use one of {sorted(LOSSES)} or a callable")
        return LOSSES[loss_fn]
    if not callable(loss_fn):
        raise MpsearchError(f"loss_fn {loss_fn!r} is not callable", "pass f(output, reference) -> scalar tensor")
    return loss_fn


class Estimator(ABC):
    """Estimate per-(layer, option) damage. Subclasses implement ``_estimate``.

    Constructor arguments are stored verbatim (scikit-learn style) and recorded in the table's metadata.
    ``estimate`` works on a private deep copy of the model, so the caller's weights, ``training`` flag,
    ``requires_grad`` flags and hooks are never touched.
    """

    name: str = "estimator"

    def get_params(self) -> dict:
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def estimate(
        self,
        model: nn.Module,
        data: Iterable,
        options: Iterable[str] = DEFAULT_OPTIONS,
        loss_fn: str | LossFn | None = None,
        cache: bool = True,
    ) -> CostTable:
        """Return a CostTable with one row per (quantizable layer, option).

        With ``cache`` (and a named loss), the table is stored under ``$MPSEARCH_CACHE/tables`` keyed by the
        model and data fingerprints, the estimator and its parameters, the options, the loss and a hash of
        the estimator code; an identical second call loads it instead of recomputing.
        """
        if not isinstance(model, nn.Module):
            raise MpsearchError(f"model is a {type(model).__name__}, not a torch.nn.Module", "pass an nn.Module")
        batches = as_batches(data)
        opts = parse_options(options)
        work = copy.deepcopy(model).eval()
        layers, ties = discover(work, example=batches[0])
        if not layers:
            raise MpsearchError("the model has no quantizable layers", "use a model with Linear or Conv layers")
        if isinstance(loss_fn, str):
            loss_name = loss_fn
        else:
            loss_name = "kl" if loss_fn is None else getattr(loss_fn, "__name__", "custom")
        meta = {
            "estimator": self.name,
            "params": {k: v for k, v in self.get_params().items() if _jsonable(v) and k != "progress"},
            "seed": getattr(self, "seed", None),
            "loss": loss_name,
            "options": [o.name for o in opts],
            "model_fingerprint": model_fingerprint(model),
            "data_fingerprint": data_fingerprint(batches),
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "ties": ties,
        }
        path = table_cache_path(meta) if cache and (loss_fn is None or isinstance(loss_fn, str)) else None
        if path is not None and path.exists():
            return CostTable.from_parquet(path)
        extra = self._estimate(work, batches, layers, opts, resolve_loss(loss_fn))
        frame = cost_rows(layers, opts).merge(extra, on=["layer", "option"], how="left", validate="one_to_one")
        table = CostTable(frame, meta)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            table.to_parquet(tmp)
            tmp.replace(path)  # atomic: a crash never leaves a half-written table
        return table

    @abstractmethod
    def _estimate(
        self, model: nn.Module, batches: list, layers: list[LayerInfo], options: list[Option], loss_fn: LossFn
    ) -> pd.DataFrame:
        """Return a frame with columns layer, option, damage (and raw columns). ``model`` is a private copy."""


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """Hash of the code that shapes a table: the estimators and the quantizer."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for folder in ("sensitivity", "mpsearch/quant", "mpsearch/core"):
        for path in sorted((root / folder).rglob("*.py")):
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def table_cache_path(meta: dict) -> Path:
    key = {k: meta[k] for k in ("estimator", "params", "loss", "options", "model_fingerprint", "data_fingerprint")}
    key["code"] = _code_hash()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_root() / "tables" / f"{meta['estimator']}-{digest}.parquet"


def _jsonable(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str | list | tuple | dict)


def weight_perturbations(model: nn.Module, layers: list[LayerInfo], options: list[Option]) -> dict:
    """||Q(W) - W||^2 per (layer, option)."""
    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for info in layers:
            w = modules[info.name].weight
            for opt in options:
                out[info.name, opt.name] = float((quantize_weight(w, opt) - w).double().pow(2).sum())
    return out
