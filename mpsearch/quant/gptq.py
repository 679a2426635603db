"""GPTQ (Frantar et al. 2023): quantize a linear layer column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse of the calibration inputs' Hessian H = X^T X.

``gptq_quantize(w, h, option)`` returns the fake-quantized weight on the option's own grid (mpsearch's int
options: fp16 scales, symmetric or asymmetric; ``gptq:`` options: GPTQ's min-max grid), blocked (lazy
batch updates of ``block_size`` columns), with relative damping ``damp`` and ``act_order`` (default on:
columns by decreasing H diagonal; off: the paper's left-to-right order). Groups are contiguous in the
original column order (mpsearch's and GPTQModel's storage layout, so act-order needs no g_idx); a group's
grid is fitted when its first column comes up, on the weights as updated so far within the current block
(the reference fits on the block-stale copy; here the fresher one). GPTQModel's default group-aware
reordering (a group's columns together, groups by their largest H diagonal) was measured worse on
minilm-l6's grouped options (uniform int3_g64_asym 0.078 vs 0.068 here), so it is not used. Hessians come
from the full-precision model's inputs (not re-collected after each quantized layer, as sequential GPTQ does).

``GPTQ`` solves against the calibration Hessian shrunk towards its diagonal as far as cross-validation says
(``gptq_shrink``; ``shrink=False``: the sample H, as the reference); it matters most with few tokens per input.

Written here after the reference implementation (IST-DASLab/gptq, gptq.py) because the libraries that ship it
(GPTQModel, AutoGPTQ) build CUDA kernels and cannot be installed here, and its quantizer must be mpsearch's
exact grid.

``GPTQ(model, batches)``: the Hessians of every linear unit (layer types of kind "linear": ``nn.Linear``,
transformers' ``Conv1D``) from one calibration pass, keyed by unit name; as a ``Quantizer``,
``quantize(unit, option)`` runs GPTQ for that unit's weight. Embeddings and convolutions, which GPTQ does not
cover here, are rounded to nearest (part of its definition, recorded in its ``spec()``); a linear unit it has
no Hessian for (another model, a renamed layer) is an error, never a silent fallback. ``state()`` /
``GPTQ.from_state`` save and restore it (``mpsearch.quant.gptq_cache`` caches it under its spec).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mpsearch.core import MpsearchError
from mpsearch.core.options import Option, parse_option
from mpsearch.core.params import Interval, OneOf
from mpsearch.quant.gptq_shrink import Moments, choose_rho, expected_error, shrink
from mpsearch.quant.quantizer import Quantizer
from mpsearch.runtimes import runtime_of

LOG = logging.getLogger("mpsearch")


def has_grid(option: Option) -> bool:
    """Whether GPTQ can quantize ``option``: its runtime says it has a grid for it (``Runtime.gptq_grid``)."""
    return runtime_of(option).gptq_grid(option) is not None


def grid_of(option: Option):
    """The option's grid for GPTQ's column loop (``fit(cols)`` -> (scale, zero, decode scale), ``lo``, ``hi``),
    or a one-line refusal."""
    grid = runtime_of(option).gptq_grid(option)
    if grid is None:
        raise MpsearchError(
            f"quantizer 'gptq' has no grid for option {option.name!r}",
            "use int<b>[_g<G>][_asym] or gptq:int<b>... options with quantizer='gptq', or quantizer='rtn'",
        )
    return grid


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    option: Option,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ of ``w`` (out, in) against inputs with Hessian ``h`` (in, in); returns Q(w) in w's shape and dtype."""
    return quantize_with(w, factor(h, damp, act_order, w.device), option, block_size)


@dataclass
class Factor:
    """What GPTQ needs of a layer's Hessian, the same for every option: the column order, the columns no
    input reaches, and the upper Cholesky factor of the damped inverse Hessian in that order. ``rho``: how
    uncertain the Hessian's off-diagonal is (``gptq_shrink.shrinkage``; 0 where it is not estimated);
    ``solved``: the shrinkage of the Hessian factored here (``gptq_shrink.choose_rho``; 0: the sample H)."""

    perm: torch.Tensor
    dead: torch.Tensor
    hinv: torch.Tensor
    rho: float = 0.0
    solved: float = 0.0

    def to(self, device) -> Factor:
        return Factor(self.perm.to(device), self.dead.to(device), self.hinv.to(device), self.rho, self.solved)


def factor(h: torch.Tensor, damp: float, act_order: bool, device=None) -> Factor:
    H, perm, dead = damped(h, damp, act_order, device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    return Factor(perm, dead, hinv)


def damped(h: torch.Tensor, damp: float, act_order: bool, device=None) -> tuple[torch.Tensor, ...]:
    """(H, perm, dead): ``h`` as GPTQ factors it, float64 in its column order ``perm`` with the columns no input
    reaches (``dead``) given a unit diagonal and damping added."""
    H = h.to(device or h.device, torch.float64).clone()
    n = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=H.device)
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype, device=H.device)
    return H, perm, dead


def quantize_with(w: torch.Tensor, f: Factor, option: Option, block_size: int = 128) -> torch.Tensor:
    """GPTQ of ``w`` with a layer's ``factor``: Q(w) on ``option``'s grid, in w's shape and dtype."""
    values, _, _ = gptq_columns(w.detach().reshape(w.shape[0], -1), f, grid_of(option), block_size, option.group_size)
    return values.reshape(w.shape).to(w.dtype)


def gptq_columns(w: torch.Tensor, f: Factor, grid, block_size: int = 128, group: int | None = None):
    """GPTQ's column loop over ``w`` (out, in) on ``grid``: (Q(w) float32 (out, in); each group's fit, by
    group; the stored index of every weight (out, in), or None where the grid's ``snap`` gives none).

    Groups of the grid's ``group_size`` columns where it has one (a GGUF block), else of ``group`` (None: the
    whole row), are fixed by the original column order (act_order keeps them); a group's grid is fitted when
    its first column comes up, on its columns in their original order as updated so far. ``grid.snap(column,
    fit, k)`` -> (values, indices or None) quantizes the group's column ``k``."""
    W = w.detach().float().clone()
    n, perm, hinv = W.shape[1], f.perm, f.hinv
    group = getattr(grid, "group_size", None) or group or n
    W[:, f.dead] = 0
    W = W[:, perm]
    at = torch.argsort(perm)  # original column -> position in GPTQ's order
    diag = hinv.diagonal().tolist()
    Q = torch.zeros_like(W)
    idx: torch.Tensor | None = None
    order = perm.tolist()
    fits: dict[int, object] = {}
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        W1, err = W[:, start:end].clone(), torch.zeros(W.shape[0], end - start, device=W.device)
        for i in range(end - start):
            g, k = divmod(order[start + i], group)
            if g not in fits:  # none of its columns is quantized yet: they are in this block or later
                pos = at[g * group : min(n, (g + 1) * group)]
                cols = W[:, pos]
                here = pos < end
                cols[:, here] = W1[:, pos[here] - start]
                fits[g] = grid.fit(cols)
            col = W1[:, i]
            q, stored = grid.snap(col, fits[g], k)
            if stored is not None:
                idx = torch.zeros(W.shape, dtype=torch.int16, device=W.device) if idx is None else idx
                idx[:, start + i] = stored
            Q[:, start + i] = q
            e = (col - q) / diag[start + i]
            W1[:, i:].addr_(e, hinv[start + i, start + i : end], alpha=-1)
            err[:, i] = e
        W[:, end:] -= err @ hinv[start:end, end:]
    return Q[:, at], fits, (None if idx is None else idx[:, at])


class GPTQ(Quantizer):
    """GPTQ as mpsearch's quantizer: per linear unit, H = X^T X / tokens over ``batches`` (real tokens only:
    see ``token_rows``), shrunk towards its diagonal (``shrink``; see the module's docstring), factored once
    (``factors``, keyed by unit name; in^2 floats per distinct input: layers fed the same tensor, such as
    q/k/v or gate/up, share one), then ``quantize(unit, option)`` = GPTQ of that unit's weight.

    Memory for large models: ``max_bytes`` bounds the Hessian sums collected at once (None: every layer in
    one calibration pass; else layers in windows, one pass each); ``offload=True`` keeps the factors in CPU
    memory and moves one layer's to the weight's device when it is used. "auto" (default for both): on an
    accelerator, windows of a quarter of its free memory, and offload when every layer's factor would take
    more than half of it; on the CPU, one pass and no offload. Neither changes the quantized values, so
    neither is in ``spec()``. ``progress``: bars over the calibration passes and the factorizations."""

    name = "gptq"
    MATH = ("block_size", "damp", "act_order", "shrink")  # the parameters that decide the quantized values
    _parameter_constraints = {
        "block_size": [Interval(int, 1)],
        "damp": [Interval(float, 0, 1, open_low=True)],
        "act_order": [bool],
        "shrink": [bool],
        "max_bytes": [OneOf(("auto",)), None, Interval(int, 1)],
        "offload": [OneOf(("auto",)), bool],
        "progress": [bool],
    }

    def __init__(
        self,
        model: nn.Module,
        batches: list,
        block_size: int = 128,
        damp: float = 0.01,
        act_order: bool = True,
        shrink: bool = True,
        max_bytes: int | str | None = "auto",
        offload: bool | str = "auto",
        progress: bool = True,
    ):
        from mpsearch.data import as_batches, data_fingerprint
        from mpsearch.layers import find_units

        self.block_size, self.damp, self.act_order, self.shrink = block_size, damp, act_order, shrink
        self.max_bytes, self.offload, self.progress = max_bytes, offload, progress
        self.validate_params()
        batches = as_batches(batches)
        self._calibration = data_fingerprint(batches)
        self.factors: dict[str, Factor] = {}
        self.passes = 0  # calibration passes made to collect the Hessians
        self._on_device: tuple = (None, None)  # (unit name, factor) of the layer last moved to its weight's device
        self._hessian: tuple = (None, None, None)  # (factor, shrunk, H) of the last ``hessian`` asked for
        units = [u for u in find_units(model) if covers(u)]
        window, self._store = _memory_plan(units, max_bytes, offload)
        groups = _windows(units, window)
        for i, group in enumerate(groups):
            self._collect(model, batches, group, f"gptq hessians {i + 1}/{len(groups)}" if len(groups) > 1 else "")

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in (*self.MATH, "max_bytes", "offload", "progress")}

    def _collect(self, model: nn.Module, batches: list, units: list, label: str = "") -> None:
        """One calibration pass summing X^T X for ``units``; their factors into ``factors``."""
        from mpsearch.outputs import attention_mask, evaluating, hooked, raw_call

        moments: dict[str, Moments] = {}
        owner: dict[str, str] = {}  # unit -> the unit whose sum holds its inputs (itself, or a sibling's)
        last: list = [None, None]  # the latest input seen and the unit that summed it
        mask: list = [None]  # the current batch's attention mask (B, T), as bools

        def hook(name: str):
            def fn(mod, inputs, output):
                if inputs[0] is last[0] and owner.get(name, last[1]) == last[1]:
                    owner[name] = last[1]
                    return
                owner[name], last[0], last[1] = name, inputs[0], name
                x = inputs[0].detach()
                moments.setdefault(name, Moments()).add(token_rows(x, mask[0]).float(), *sample_ids(x, mask[0]))

            return fn

        quiet = not self.progress
        with hooked(u.module.register_forward_hook(hook(u.name)) for u in units), evaluating(model), torch.no_grad():
            for batch in tqdm(batches, desc=label or "gptq hessians", disable=quiet or len(batches) < 2, leave=False):
                m = attention_mask(batch)
                mask[0] = m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None
                raw_call(model, batch)
                last[:] = [None, None]
        self.passes += 1
        _warn_few_tokens({src: sum(moments[src].tokens) for src in set(owner.values())}, {u.name: u for u in units})
        factored: dict[str, Factor] = {}
        for u in tqdm(units, desc="gptq factors", disable=quiet or len(units) < 2, leave=False):
            if u.name in owner:
                src = owner[u.name]
                if src not in factored:
                    m = moments.pop(src)
                    h = m.hessian()
                    rho = m.rho(h)
                    solved = choose_rho(m, rho, self._score) if self.shrink else 0.0
                    f = factor(shrink(h, solved), self.damp, self.act_order)
                    f.rho, f.solved = rho, solved
                    factored[src] = f if self._store is None else f.to(self._store)
                self.factors[u.name] = factored[src]

    def _score(self, h_fit: torch.Tensor, h_test: torch.Tensor) -> float:
        """GPTQ's expected error on inputs with Hessian ``h_test`` when it solves with ``h_fit``."""
        H, perm, _ = damped(h_fit, self.damp, self.act_order)
        return expected_error(H, perm, h_test)

    def params(self) -> dict:
        return {k: getattr(self, k) for k in self.MATH}

    def calibration(self) -> str:
        return self._calibration

    def spec(self) -> dict:
        return self.spec_of(self.params(), self._calibration)

    @classmethod
    def spec_of(cls, params: dict, calibration: str) -> dict:
        """The spec of a GPTQ with ``params`` (the rest at their defaults) built on data of that fingerprint,
        without building it (the cache looks it up by this)."""
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k in cls.MATH}
        full = {k: params.get(k, defaults[k]) for k in cls.MATH}
        # convolutions and embeddings: round to nearest, part of the definition
        return {"name": cls.name, "params": full, "calibration": calibration, "other_layers": "rtn"}

    @classmethod
    def supports(cls, option: Option) -> bool:
        return has_grid(option)

    def _factor(self, unit) -> Factor | None:
        """The unit's factor on its weight's device (None: a layer type GPTQ does not cover)."""
        f = self.factors.get(unit.name)
        if f is None:
            if covers(unit):
                raise MpsearchError(
                    f"quantizer 'gptq' has no Hessian for layer {unit.name!r} (it was built on another model, or "
                    "the layer was renamed)",
                    "build the GPTQ quantizer on this very model: GPTQ(model, calibration_batches)",
                )
            return None
        n_in = unit.weight[0].numel()
        if f.hinv.shape[0] != n_in:
            raise MpsearchError(
                f"quantizer 'gptq' holds a {f.hinv.shape[0]}-input Hessian for layer {unit.name!r}, whose weight "
                f"has {n_in} inputs (it was built on another model)",
                "build the GPTQ quantizer on this very model: GPTQ(model, calibration_batches)",
            )
        device = unit.weight.device
        if f.hinv.device != device:  # offloaded: one layer's factor on the device at a time
            if self._on_device[0] != unit.name:
                self._on_device = (unit.name, f.to(device))
            f = self._on_device[1]
        return f

    def quantize(self, unit, option: Option | str) -> torch.Tensor:
        option = parse_option(option) if isinstance(option, str) else option
        grid_of(option)  # refuses, in one line, options GPTQ has no grid for
        f = self._factor(unit)
        if f is None:  # convolutions, embeddings: round to nearest, by definition (spec()["other_layers"])
            from mpsearch.quant.formats import quantize_weight

            return quantize_weight(unit.weight, option)
        return quantize_with(unit.weight, f, option, self.block_size)

    def packed(self, unit, option: Option | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the bytes a GGUF holds, their decoded values) of ``unit`` in llama.cpp type ``option``: GPTQ on
        llama.cpp's blocks (``mpsearch.quant.gptq_gguf``), or for a unit GPTQ does not cover llama-quantize's
        reference; the values equal ``quantize(unit, option)``'s."""
        from mpsearch.quant.gptq_gguf import packed_with
        from mpsearch.quant.llama_cpp import quantize_rows

        option = parse_option(option) if isinstance(option, str) else option
        grid_of(option)
        f = self._factor(unit)
        rows = unit.weight.detach().reshape(unit.weight.shape[0], -1)
        return quantize_rows(rows, option) if f is None else packed_with(rows, f, option, self.block_size)

    def hessian(self, unit, shrunk: bool = True) -> torch.Tensor | None:
        """The Hessian of the unit's inputs (in, in), in its weight's column order, float32 on its device (None:
        a layer type GPTQ does not cover), recovered from its factor rather than kept twice. ``shrunk``: the
        estimate of the inputs' population second moment (1 - rho) H + rho diag(H), rho the factor's
        Schaefer-Strimmer weight; else the sample H = X^T X / tokens (not kept where GPTQ solved against
        diag(H) alone)."""
        stored = self.factors.get(unit.name)
        if stored is None:
            self._factor(unit)  # the error for a linear unit it should know
            return None
        target = stored.rho if shrunk else 0.0
        if stored.solved >= 1 and target < 1:
            raise MpsearchError(
                f"GPTQ solved against the diagonal of this layer's Hessian alone and kept no off-diagonal "
                f"(the shrinkage cross-validation chose rho = 1), so its {'shrunk' if shrunk else 'sample'} "
                "Hessian cannot be recovered",
                "build it with GPTQ(model, data, shrink=False) to keep the sample Hessian X^T X / tokens",
            )
        w = unit.weight
        last, was_shrunk, h = self._hessian
        if last is stored and was_shrunk == shrunk and h.device == w.device:  # q/k/v, gate/up: one input
            return h
        f = self._factor(unit)
        h = torch.cholesky_inverse(f.hinv.double(), upper=True)  # (U^T U)^-1: the damped H in GPTQ's order
        back = torch.argsort(f.perm)
        h = h[back[:, None], back]  # one in x in copy, in w's column order
        # ``factor`` added damp * mean(diag) to a diagonal whose mean was 1 / (1 + damp) of the damped one's
        h.diagonal().sub_(self.damp / (1 + self.damp) * float(h.diagonal().mean()))
        h[f.dead] = 0
        h[:, f.dead] = 0
        if target != f.solved:  # off the diagonal the factor holds (1 - solved) H: rescale to (1 - target) H
            shrink(h, 1 - (1 - target) / (1 - f.solved))
        self._hessian = (stored, shrunk, h.float())
        return self._hessian[2]

    def state(self) -> dict:
        """Everything ``from_state`` needs, as plain tensors and numbers (``torch.save``/``weights_only`` safe);
        a factor shared by several units is stored once."""
        distinct: dict[int, int] = {}
        factors, names = [], {}
        for name, f in self.factors.items():
            if id(f) not in distinct:
                distinct[id(f)] = len(factors)
                factors.append({"perm": f.perm, "dead": f.dead, "hinv": f.hinv, "rho": f.rho, "solved": f.solved})
            names[name] = distinct[id(f)]
        return {"spec": self.spec(), "names": names, "factors": factors, "passes": self.passes}

    @classmethod
    def from_state(cls, state: dict, device=None, progress: bool = True) -> GPTQ:
        """A GPTQ restored from ``state()`` (factors on ``device``, default where they were saved from)."""
        self = cls.__new__(cls)
        spec = state["spec"]
        for key in cls.MATH:
            setattr(self, key, spec["params"][key])
        self.max_bytes, self.offload, self.progress = "auto", "auto", progress
        self.validate_params()
        self._calibration = spec["calibration"]
        shared = [
            Factor(f["perm"], f["dead"], f["hinv"], float(f["rho"]), float(f["solved"])) for f in state["factors"]
        ]
        shared = [f.to(device) if device is not None else f for f in shared]
        self.factors = {name: shared[i] for name, i in state["names"].items()}
        self.passes, self._store = int(state.get("passes", 0)), None
        self._on_device, self._hessian = (None, None), (None, None, None)
        return self


def covers(unit) -> bool:
    """Whether GPTQ quantizes the unit with error feedback: layer types whose inputs enter a matmul
    (``LayerType.inputs == "matmul"``: ``nn.Linear``, transformers' ``Conv1D``); the others (convolutions,
    embeddings) are rounded to nearest."""
    return unit.type.inputs == "matmul"


def _warn_few_tokens(counts: dict[str, int], units: dict) -> None:
    """Say (once per calibration pass) which Hessians come from fewer real tokens than the layer has inputs:
    H is then singular but for the damping, and GPTQ fits those few tokens at the cost of any others."""
    few = {name: n for name, n in counts.items() if n < units[name].weight.shape[-1]}
    if few:
        name = min(few, key=lambda k: few[k] / units[k].weight.shape[-1])
        LOG.warning(
            "mpsearch: GPTQ's Hessians of %d layer(s) come from fewer calibration tokens than inputs (%s: %d tokens "
            "for %d inputs); GPTQ overfits so few tokens (its shrunk Hessians only limit that): pass more "
            "calibration data (GPTQ's authors use 128 sequences of 2048 tokens)",
            len(few),
            name,
            few[name],
            units[name].weight.shape[-1],
        )


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input's rows (tokens) that enter the Hessian: with a batch's attention mask (B, T) and an input
    laid out (B, T, in), only the real tokens (padding is never read by the model's outputs, and llm-compressor's
    GPTQ leaves it out the same way); any other layout, every row."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def sample_ids(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(the sample, i.e. index along the batch, each of ``token_rows(x, mask)``'s rows comes from; the batch's
    number of samples)."""
    batch = x.shape[0] if x.dim() > 1 else 1
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return torch.repeat_interleave(torch.arange(batch, device=x.device), mask.to(x.device).sum(1)), batch
    rows = x.numel() // max(x.shape[-1], 1)
    return torch.arange(rows, device=x.device) // max(rows // batch, 1), batch


def _hessian_bytes(unit) -> int:
    """Bytes of a unit's float32 factor, in x in (its Hessian sums while collecting: twice that, one per fold)."""
    return 4 * unit.weight.shape[-1] ** 2


def _windows(units: list, window: int | None) -> list[list]:
    """``units`` in order, cut into runs whose Hessian sums (two per unit: ``Moments``' folds) fit ``window``
    bytes (None: one run; a unit larger than the window is a run of its own)."""
    runs: list[list] = [[]]
    size = 0
    for u in units:
        if runs[-1] and window is not None and size + 2 * _hessian_bytes(u) > window:
            runs.append([])
            size = 0
        runs[-1].append(u)
        size += 2 * _hessian_bytes(u)
    return [r for r in runs if r]


def _memory_plan(units: list, max_bytes, offload) -> tuple[int | None, torch.device | None]:
    """(bytes of Hessian sums per calibration pass or None for one pass, device to keep factors on or None
    for where they are made), resolving "auto" from the free memory of the weights' device."""
    device = units[0].weight.device if units else torch.device("cpu")
    free = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    total = sum(_hessian_bytes(u) for u in units)  # every layer's factor (an upper bound: no sharing)
    window = (free // 4 if free is not None else None) if max_bytes == "auto" else max_bytes
    if offload == "auto":
        offload = free is not None and total > free // 2
    return window, (torch.device("cpu") if offload else None)


def reconstruction_error(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor) -> float:
    """Layer-wise reconstruction error tr((Q - W) H (Q - W)^T): what GPTQ minimizes greedily."""
    d = (q - w).reshape(w.shape[0], -1).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d)) if math.prod(w.shape) else 0.0
