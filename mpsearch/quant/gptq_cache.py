"""Calibrated quantizers' state (GPTQ, imatrix) cached under its spec: building GPTQ (Hessians, shrinkage
cross-validation, factors) costs a calibration pass and minutes on large models, and every search, ``evaluate``,
``apply_plan`` and ``quantize`` of such a plan needs exactly the same one (an imatrix read from a file, too:
later commands find it by the file's fingerprint). Stored under ``$MPSEARCH_CACHE/quantizers``, keyed by the
spec (name, parameters, calibration fingerprint), the model's fingerprint and the quantizer code; written
atomically, read with ``weights_only``. A state larger than ``MAX_CACHED_BYTES`` is not written (said once)."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

LOG = logging.getLogger("mpsearch")
MAX_CACHED_BYTES = 4 << 30  # an 8B model's factors (~30 GB) are rebuilt rather than written to disk


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for path in sorted([*here.glob("gptq*.py"), here / "imatrix.py"]):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _path(model, spec: dict) -> Path:
    from mpsearch.data import cache_root
    from mpsearch.layers import model_fingerprint

    key = {"spec": spec, "model": model_fingerprint(model), "code": _code_hash()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_root() / "quantizers" / f"{spec['name']}-{digest}.pt"


def load_cached(model, spec: dict, progress: bool = True, path: Path | None = None):
    """The cached quantizer of ``spec`` for ``model`` (GPTQ's factors on the model's device), or None.
    ``path``: its cache file when the caller has it already (finding it hashes every weight of the model)."""
    from mpsearch.outputs import model_device
    from mpsearch.quant.gptq import GPTQ
    from mpsearch.quant.imatrix import Imatrix

    path = _path(model, spec) if path is None else path
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file must not poison later runs
        LOG.warning("mpsearch: cached quantizer %s is unreadable (%s); rebuilding it", path, err)
        path.unlink(missing_ok=True)
        return None
    if spec["name"] == "imatrix":
        return Imatrix.from_state(state, progress)
    return GPTQ.from_state(state, model_device(model), progress)


def store_state(model, quantizer) -> None:
    """Save ``quantizer``'s state under its spec (an imatrix read from a file: later commands given only the
    plan find it)."""
    from mpsearch.data import store_in_cache

    state = quantizer.state()
    store_in_cache(_path(model, quantizer.spec()), lambda tmp: torch.save(state, tmp))


def cached_imatrix(model, batches: list, cache: bool = True, progress: bool = True):
    """Imatrix(model, batches), loaded from the cache when an identical one was saved, else built and saved."""
    from mpsearch.data import data_fingerprint
    from mpsearch.quant.imatrix import Imatrix

    if not cache:
        return Imatrix(model, batches, progress=progress)
    spec = Imatrix.spec_of({}, data_fingerprint(batches))
    path = _path(model, spec)
    found = load_cached(model, spec, progress, path)
    if found is not None:
        return found
    quantizer = Imatrix(model, batches, progress=progress)
    store_state(model, quantizer)
    return quantizer


def cached_gptq(model, batches: list, params: dict, cache: bool = True, progress: bool = True):
    """GPTQ(model, batches, **params), loaded from the cache when an identical one was saved, else built and
    saved (``cache=False``: neither)."""
    from mpsearch.data import store_in_cache
    from mpsearch.quant.gptq import GPTQ

    if not cache:
        return GPTQ(model, batches, progress=progress, **params)
    from mpsearch.data import data_fingerprint

    spec = GPTQ.spec_of(params, data_fingerprint(batches))
    path = _path(model, spec)  # one hash of the model's weights, for the look-up and the store alike
    found = load_cached(model, spec, progress, path)
    if found is not None:
        return found
    quantizer = GPTQ(model, batches, progress=progress, **params)
    state = quantizer.state()
    size = sum(f["hinv"].numel() * 4 for f in state["factors"])
    if size <= MAX_CACHED_BYTES:
        store_in_cache(path, lambda tmp: torch.save(state, tmp))
    else:
        LOG.info("mpsearch: GPTQ state of %.1f GB not cached (over %.1f GB)", size / 1e9, MAX_CACHED_BYTES / 1e9)
    return quantizer
