"""GPTQ (Frantar et al. 2023): quantize a linear layer column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse of the calibration inputs' Hessian H = X^T X.

``gptq_quantize(w, h, option)`` returns the fake-quantized weight on the option's own grid (mpsearch's int
options: fp16 scales, symmetric or asymmetric; ``gptq:`` options: GPTQ's min-max grid), blocked (lazy
batch updates of ``block_size`` columns), with relative damping ``damp`` and optional ``act_order``
(columns by decreasing H diagonal). Groups are contiguous in the original column order (mpsearch's and
GPTQModel's storage layout); a group's grid is fitted when its first column comes up, on the weights as
updated so far within the current block (the reference fits on the block-stale copy; here the fresher
one). Hessians come from the full-precision model's inputs (not re-collected after each quantized layer,
as sequential GPTQ does). Written here after the reference implementation (IST-DASLab/gptq, gptq.py)
because the libraries that ship it (GPTQModel, AutoGPTQ) build CUDA kernels and cannot be installed here,
and its quantizer must be mpsearch's exact grid.

``GPTQ(model, batches)``: the Hessians of every linear unit from one calibration pass; as a quantizer,
``weight(w, option)`` runs GPTQ for a unit's weight (RTN for weights it has no Hessian for: embeddings and
convolutions, which GPTQ does not cover here). ``use(quantizer)`` makes ``quantize_weight`` go through it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from mpsearch.core import MpsearchError
from mpsearch.core.options import Option
from mpsearch.quant import gptq_grid


def has_grid(option: Option) -> bool:
    """Whether GPTQ can quantize ``option``: integer grids of mpsearch's own or GPTQModel's."""
    return option.kind == "int" and option.runtime in ("mpsearch", "gptq")


def check_options(quantizer, options: list[Option]) -> None:
    """Refuse, before any work, options ``quantizer`` (GPTQ) has no grid for."""
    for opt in options:
        if not has_grid(opt):
            raise MpsearchError(
                f"quantizer {quantizer.name!r} cannot quantize option {opt.name!r}",
                "use int<b>[_g<G>][_asym] or gptq: options with it, or the default quantizer (round to nearest)",
            )


class _Grid:
    """An option's quantization grid: ``fit(cols)`` -> (scale, zero) per row; ``apply(col, scale, zero)``."""

    def __init__(self, option: Option) -> None:
        self.option = option
        if not has_grid(option):
            raise MpsearchError(
                f"quantizer 'gptq' has no grid for option {option.name!r}",
                "use int<b>[_g<G>][_asym] or gptq:int<b>... options with quantizer='gptq', or quantizer='rtn'",
            )
        self.gptq = option.runtime == "gptq"

    def fit(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.option
        if self.gptq:
            scale, zero = gptq_grid.grid(cols, o)
            return scale[:, 0], zero[:, 0]
        if o.symmetric:
            scale = (torch.maximum(cols.amax(1), -cols.amin(1)) / (2 ** (o.bits - 1) - 1)).half().float()
            return torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scale)
        levels = 2**o.bits - 1
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        scale = ((hi - lo) / levels).half().float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.clamp(torch.round(-lo / scale), 0, levels)

    def apply(self, col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        o = self.option
        if self.gptq:
            return gptq_grid.dequantized(col, scale, zero, o)
        if o.symmetric:
            qmax = 2 ** (o.bits - 1) - 1
            return torch.clamp(torch.round(col / scale), -qmax - 1, qmax) * scale
        return (torch.clamp(torch.round(col / scale) + zero, 0, 2**o.bits - 1) - zero) * scale


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    option: Option,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ of ``w`` (out, in) against inputs with Hessian ``h`` (in, in); returns Q(w) in w's shape and dtype."""
    grid = _Grid(option)
    W = w.detach().reshape(w.shape[0], -1).float().clone()
    H = h.to(W.device, torch.float64).clone()
    n = W.shape[1]
    group = option.group_size or n
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype, device=H.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    scale = zero = None
    if option.group_size is None:
        scale, zero = grid.fit(W)
    group_of = perm // group  # groups are fixed by the original column order (act_order keeps them)
    params: dict[int, tuple] = {}
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        W1, err = W[:, start:end].clone(), torch.zeros(W.shape[0], end - start, device=W.device)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = W1[:, i]
            if option.group_size is not None:
                g = int(group_of[start + i])
                if g not in params:  # fit the group when its first column comes up, on the updated weights
                    members = (group_of == g).nonzero().squeeze(1)
                    cur = torch.cat([W1[:, i:], W[:, end:]], 1)
                    idx = members[members >= start + i] - (start + i)
                    params[g] = grid.fit(cur[:, idx])
                scale, zero = params[g]
            q = grid.apply(col, scale, zero)
            Q[:, start + i] = q
            e = (col - q) / h1[i, i]
            W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        W[:, end:] -= err @ hinv[start:end, end:]
    Q = Q[:, torch.argsort(perm)]
    return Q.reshape(w.shape).to(w.dtype)


class GPTQ:
    """GPTQ as mpsearch's quantizer: per linear unit, H = X^T X / tokens from one pass over ``batches``
    (memory: in^2 floats per linear unit), then ``weight(w, option)`` = GPTQ of that unit's weight."""

    name = "gptq"

    def __init__(self, model: nn.Module, batches: list, block_size: int = 128, damp: float = 0.01, act_order=False):
        from mpsearch.layers import find_units
        from mpsearch.outputs import evaluating, raw_call

        self.block_size, self.damp, self.act_order = block_size, damp, act_order
        self.hessians: dict[tuple, torch.Tensor] = {}
        counts: dict[str, int] = {}
        sums: dict[str, torch.Tensor] = {}
        units = [u for u in find_units(model) if isinstance(u.module, nn.Linear) or u.type.transposed]

        def hook(name: str):
            def fn(mod, inputs, output):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            return fn

        handles = [u.module.register_forward_hook(hook(u.name)) for u in units]
        try:
            with evaluating(model), torch.no_grad():
                for batch in batches:
                    raw_call(model, batch)
        finally:
            for h in handles:
                h.remove()
        for u in units:
            if u.name in sums:
                w = u.weight
                self.hessians[_key(w)] = sums[u.name] / max(counts[u.name], 1)

    def params(self) -> dict:
        return {"block_size": self.block_size, "damp": self.damp, "act_order": self.act_order}

    def weight(self, w: torch.Tensor, option: Option, fallback) -> torch.Tensor:
        h = self.hessians.get(_key(w))
        if h is None:  # embeddings and convolutions: round to nearest
            return fallback(w, option)
        return gptq_quantize(w, h, option, self.block_size, self.damp, self.act_order)


def _key(w: torch.Tensor) -> tuple:
    """A weight's identity that survives transposed views (transformers' Conv1D): storage, shape, strides."""
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))


_CURRENT: ContextVar[GPTQ | None] = ContextVar("mpsearch_quantizer", default=None)


def current() -> GPTQ | None:
    return _CURRENT.get()


@contextmanager
def use(quantizer: GPTQ | None) -> Iterator[None]:
    """Within the block, ``quantize_weight`` quantizes the weights ``quantizer`` knows with it."""
    token = _CURRENT.set(quantizer)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def reconstruction_error(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor) -> float:
    """Layer-wise reconstruction error tr((Q - W) H (Q - W)^T): what GPTQ minimizes greedily."""
    d = (q - w).reshape(w.shape[0], -1).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d)) if math.prod(w.shape) else 0.0
