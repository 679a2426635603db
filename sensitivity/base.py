"""Estimator base class: shared plumbing for every sensitivity estimator."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mpsearch.core import DEFAULT_OPTIONS, CostTable, LayerInfo, MpsearchError, Option, cost_rows, parse_options
from mpsearch.core.params import Configurable
from mpsearch.data import as_batches, cache_root, data_fingerprint, store_in_cache
from mpsearch.layers import Unit, discover, find_units, model_fingerprint, require_finite, require_layers
from mpsearch.outputs import LossFn, Objective, OutputFn, evaluating, model_device, resolve_objective
from mpsearch.quant.quantizer import RTN, Quantizer
from sensitivity.sums import dot64


class Estimator(Configurable, ABC):
    """Estimate per-(layer, option) damage. Subclasses implement ``_estimate``.

    Constructor arguments are stored verbatim (scikit-learn style), checked by ``validate_params`` against
    ``_parameter_constraints`` before any work, and recorded in the table's metadata. ``estimate`` works on
    the caller's model itself, where it lives (CPU, CUDA, MPS), never on a copy: ``borrowed`` puts it in
    eval mode with gradients off and restores every ``training``/``requires_grad`` flag and ``.grad`` on
    exit; quantized weights are only swapped in (``mpsearch.quant.swapped``), never written; hooks are
    removed in ``finally``. So the model is byte-identical afterwards, also when an estimator fails.
    """

    component = "estimator"
    name: str = "estimator"
    memory_hint: str = "use fewer or smaller calibration batches"  # what to lower after an out-of-memory

    def estimate(
        self,
        model: nn.Module,
        data: Iterable,
        options: Iterable[str] = DEFAULT_OPTIONS,
        loss_fn: str | LossFn | None = None,
        cache: bool = True,
        output_fn: OutputFn | None = None,
        include=None,
        exclude=None,
        quantizer=None,
    ) -> CostTable:
        """Return a CostTable with one row per (quantizable unit, option).

        ``loss_fn``: None (KL of logits; cosine for embedding models), "kl", "cosine" or f(output, reference).
        ``output_fn(output, batch) -> tensor`` overrides the output convention (``mpsearch.outputs``);
        ``include``/``exclude``: FQN patterns selecting layers (``mpsearch.layers``); ``quantizer``: a
        ``mpsearch.quant.quantizer.Quantizer`` (None: round to nearest, ``RTN``) that makes every quantized
        weight of the estimate; the table records its ``spec()``.
        With ``cache`` (a named loss, no output_fn), the table is stored under ``$MPSEARCH_CACHE/tables`` keyed
        by the model and data fingerprints, the estimator and its parameters, the options, the layers, the
        loss and a hash of the estimator code; an identical second call loads it instead of recomputing.
        """
        self.validate_params()
        if not isinstance(model, nn.Module):
            raise MpsearchError(f"model is a {type(model).__name__}, not a torch.nn.Module", "pass an nn.Module")
        batches = as_batches(data)
        opts = parse_options(options)
        quantizer = RTN() if quantizer is None else quantizer
        if not isinstance(quantizer, Quantizer):
            raise MpsearchError(
                f"quantizer {quantizer!r} is not a Quantizer", "pass mpsearch.quant.quantizer.RTN() or a GPTQ instance"
            )
        quantizer.check_options(opts)
        try:
            return self._table(model, batches, opts, loss_fn, cache, output_fn, include, exclude, quantizer)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _out_of_memory(err):
                raise
            raise MpsearchError(
                f"estimator {self.name!r} ran out of memory on {model_device(model)} (the model is unchanged)",
                self.memory_hint,
            ) from err

    def _table(self, model, batches, opts, loss_fn, cache, output_fn, include, exclude, quantizer) -> CostTable:
        """Discover the layers, resolve the loss, use the cached table or run ``_estimate``."""
        layers, ties = discover(model, example=batches[0], include=include, exclude=exclude)
        require_layers(layers)
        with evaluating(model):
            objective = resolve_objective(loss_fn, output_fn, model, batches[0])
        meta = {
            "estimator": self.name,
            "params": {k: v for k, v in self.get_params().items() if _jsonable(v) and k != "progress"},
            "seed": getattr(self, "seed", None),
            "loss": objective.name,
            "options": [o.name for o in opts],
            "layers": [info.name for info in layers],
            "aliases": {info.name: list(info.aliases) for info in layers if info.aliases},
            "architecture": getattr(getattr(model, "config", None), "model_type", None),
            "quantizer": quantizer.spec(),
            "model_fingerprint": model_fingerprint(model),
            "data_fingerprint": data_fingerprint(batches),
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
            "ties": ties,
            "runtime_inputs": self._models_inputs(opts),
        }
        named = (loss_fn is None or isinstance(loss_fn, str)) and output_fn is None
        path = table_cache_path(meta) if cache and named else None
        if path is not None and path.exists():
            try:
                return CostTable.from_parquet(path)
            except MpsearchError as err:  # a truncated or garbage entry must not poison later runs
                LOG.warning("mpsearch: cached table %s is unreadable (%s); recomputing it", path, err.what)
                path.unlink(missing_ok=True)
        require_finite(units_for(model, layers))
        began = time.perf_counter()
        with borrowed(model):
            extra = self._estimate(model, batches, layers, opts, objective, quantizer)
        frame = cost_rows(layers, opts).merge(extra, on=["layer", "option"], how="left", validate="one_to_one")
        table = CostTable(frame, {**meta, "estimate_s": round(time.perf_counter() - began, 3)})
        if path is not None:
            store_in_cache(path, table.to_parquet)
        return table

    def _models_inputs(self, opts: list[Option]) -> bool:
        """Whether the table counts the runtime's input rounding (``Runtime.input_rounding``) of these options:
        estimators with a ``runtime_inputs`` switch do when it is on; the log says so of the others."""
        from mpsearch.runtimes.inputs import rounding_of

        rounded = sorted({o.name for o in opts if rounding_of(o) is not None})
        if rounded and not hasattr(self, "runtime_inputs"):
            LOG.warning(
                "mpsearch: estimator %r counts the weights' error alone, not how the runtime rounds the inputs of "
                "%s layers (fisher and measured count both)",
                self.name,
                ", ".join(rounded),
            )
        return bool(rounded) and bool(getattr(self, "runtime_inputs", False))

    @abstractmethod
    def _estimate(
        self,
        model: nn.Module,
        batches: list,
        layers: list[LayerInfo],
        options: list[Option],
        objective: Objective,
        quantizer: Quantizer,
    ) -> pd.DataFrame:
        """Return a frame with columns layer, option, damage (and raw columns). ``model`` is the caller's,
        borrowed: set ``requires_grad`` or hooks freely (restored / removed afterwards), but never write a
        weight — swap quantized ones in with ``mpsearch.quant.swapped``. Every quantized weight comes from
        ``quantizer`` (``quantizer.quantize(unit, option)`` / ``quantizer.error(unit, option)``)."""


LOG = logging.getLogger("mpsearch")


def _out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS raise torch.OutOfMemoryError; the CPU allocator raises RuntimeError("... can't allocate memory")."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err) or "out of memory" in str(err)


@contextmanager
def borrowed(model: nn.Module) -> Iterator[nn.Module]:
    """The caller's model for one estimate: eval mode and no parameter requiring a gradient inside; on exit
    (also on error) every module's ``training`` flag and every parameter's ``requires_grad`` and ``.grad`` are
    what they were."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    with evaluating(model):
        try:
            for p, _, _ in saved:
                p.requires_grad_(False)
                p.grad = None
            yield model
        finally:
            for p, flag, grad in saved:
                p.requires_grad_(flag)
                p.grad = grad


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """Hash of the code that shapes a table: the estimators and the quantizer."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    files = [root / "mpsearch" / "outputs.py", root / "mpsearch" / "layers.py"]
    for folder in ("sensitivity", "mpsearch/quant", "mpsearch/core", "mpsearch/runtimes"):
        files += sorted((root / folder).rglob("*.py"))
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def table_cache_path(meta: dict) -> Path:
    fields = ("estimator", "params", "loss", "options", "layers", "model_fingerprint", "data_fingerprint", "quantizer")
    key = {k: meta[k] for k in fields}
    key["code"] = _code_hash()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_root() / "tables" / f"{meta['estimator']}-{digest}.parquet"


def _jsonable(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str | list | tuple | dict)


def units_for(model: nn.Module, layers: list[LayerInfo]) -> list[Unit]:
    """The model's units for the table's layers, in the layers' order."""
    units = {u.name: u for u in find_units(model)}
    return [units[info.name] for info in layers]


def trainable_weights(model: nn.Module, layers: list[LayerInfo]) -> list[nn.Parameter]:
    """Gradients only for the layers' weights, in the layers' order (``model`` is ``borrowed``: every other
    parameter has requires_grad off). A shared weight is one parameter, so its gradient gathers every use."""
    params = []
    for unit in units_for(model, layers):
        unit.module.weight.requires_grad_(True)
        params.append(unit.module.weight)
    return params


def weight_perturbations(model: nn.Module, layers: list[LayerInfo], options: list[Option], quantizer) -> dict:
    """||Q(W) - W||^2 per (layer, option); one quantized copy of one layer at a time (NaN, not computed, where
    the option cannot store the layer)."""
    out = {}
    with torch.no_grad():
        for unit in units_for(model, layers):
            for opt in options:
                out[unit.name, opt.name] = dot64(quantizer.error(unit, opt)) if quantizer.takes(unit, opt) else NAN
    return out


NAN = float("nan")  # damage of a (layer, option) the option's runtime cannot store: the table drops the row
