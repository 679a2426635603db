"""SQNR: signal-to-quantization-noise ratio of each layer's weights and outputs on calibration data."""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mpsearch.core import LayerInfo, Option
from mpsearch.core.params import OneOf
from mpsearch.layers import Unit, layer_type
from mpsearch.outputs import Objective, hooked, raw_call
from sensitivity.base import NAN, Estimator, units_for
from sensitivity.sums import dot64


def _db(ratio: float) -> float:
    return -10 * math.log10(ratio) if ratio > 0 else math.inf


class _Gram:
    """Linear maps (nn.Linear, transformers Conv1D): the noise X dW^T has energy tr(dW G dW^T), G = X^T X.

    One pass collects G; every option then costs one (out x in) @ (in x in) product instead of a pass over
    the data. Siblings fed the very same input tensor (q/k/v, gate/up) share one G. Products run in
    float32 (float64 matmuls cost 2-3x on CPUs and far more on most GPUs); sums of squares of float32
    values keep ~1e-6 relative accuracy, plenty for a ratio that spans orders of magnitude."""

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.gram = torch.zeros(n_in, n_in, dtype=torch.float32, device=device)

    def observe(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram.addmm_(x.T, x)

    def noise(self, delta: torch.Tensor, option: str) -> float:  # delta: (out, in), output channels first
        return float((delta @ self.gram).mul_(delta).sum())


class _Direct:
    """Linear maps whose G would take more memory than their own weight (a bf16 weight, a down projection
    wider in than out) or more time than the products themselves (few calibration tokens): ||X dW^T||^2 is
    summed batch by batch, dW requantized each time (one option's dW alive at a time, nothing kept)."""

    def __init__(self, unit: Unit, options: list[Option], quantizer) -> None:
        self.unit, self.quantizer = unit, quantizer
        self.options = [opt for opt in options if quantizer.takes(unit, opt)]
        self.total = {opt.name: 0.0 for opt in self.options}

    def observe(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        for opt in self.options:
            delta = self.quantizer.error(self.unit, opt)
            self.total[opt.name] += float((x @ delta.T).square_().sum())

    def noise(self, delta: torch.Tensor, option: str) -> float:
        return self.total[option]


class _Counts:
    """Embeddings: the noise of looking up row v of dW, summed over lookups, is count_v ||dW_v||^2."""

    def __init__(self, n_rows: int, device: torch.device) -> None:
        self.counts = torch.zeros(n_rows, dtype=torch.float32, device=device)

    def observe(self, ids: torch.Tensor) -> None:
        self.counts += torch.bincount(ids.reshape(-1), minlength=self.counts.numel()).float()

    def noise(self, delta: torch.Tensor, option: str) -> float:
        return float(self.counts @ delta.square().sum(1))


QUANTIZE_FLOPS = 30  # rough cost of fake-quantizing one weight, in multiply-adds (for the method choice)


def use_gram(x: torch.Tensor, weight: torch.Tensor, n_options: int, n_batches: int) -> bool:
    """Gram statistics when they cost no more memory than the weight and no more time than direct products.

    Per linear map (n rows per batch, B batches, K options): Gram costs n B in^2 + K out in^2 multiply-adds
    and 4 in^2 bytes; direct costs K n B in out + K B out in QUANTIZE_FLOPS and no memory. The memory rule
    keeps SQNR's statistics under 1x the weights' bytes in total."""
    n_in, n_out = weight.shape[1], weight.shape[0]
    tokens = x.numel() // n_in * n_batches
    gram_flops = tokens * n_in * n_in + n_options * n_out * n_in * n_in
    direct_flops = n_options * (tokens * n_in * n_out + n_batches * n_out * n_in * QUANTIZE_FLOPS)
    return 4 * n_in * n_in <= weight.numel() * weight.element_size() and gram_flops <= direct_flops


@torch.no_grad()
def noise_ratios(
    model: nn.Module,
    batches: list,
    units: list[Unit],
    options: list[Option],
    quantizer,
    progress: bool = False,
    method: str = "auto",
) -> pd.DataFrame:
    """Per (unit, option): ``output_nsr`` = ||X (Q(W) - W)||^2 / ||layer output||^2 over the calibration
    batches (summed over the modules sharing the weight) and ``weight_nsr`` = ||Q(W) - W||^2 / ||W||^2, with
    both as dB (``sqnr_db``, ``sqnr_weight_db``).

    One forward pass over the batches. Linear maps keep input statistics (``_Gram``) or sum the options'
    output noise directly (``_Direct``), per layer by ``use_gram`` (``method="auto"``) or as forced
    ("gram"/"direct"); embeddings count lookups (``_Counts``). Convolutions (small models) get the layer
    itself called with weight Q(W) - W and zero bias inside the pass, so any Conv subclass is handled.
    Nothing but these statistics and one layer's dW at a time is held beside the model.
    """
    modules = dict(model.named_modules())
    owner = {name: u for u in units for name in u.names}
    signal = {name: 0.0 for name in owner}
    conv_noise: dict[tuple[str, str], float] = {}
    stats: dict[str, _Gram | _Direct | _Counts] = {}
    last: list = [None, None]  # (input tensor, its _Gram) of the latest linear call: shared by siblings
    busy = set()  # a conv's hook calls the conv again: skip that re-entrant call

    def linear_stats(name: str, x: torch.Tensor) -> _Gram | _Direct:
        if last[0] is x and isinstance(last[1], _Gram):
            return last[1]  # a sibling fed the same tensor: its G is this layer's G
        unit = owner[name]
        gram = method == "gram" or (method == "auto" and use_gram(x, unit.weight, len(options), len(batches)))
        return _Gram(x.shape[-1], x.device) if gram else _Direct(unit, options, quantizer)

    def hook(name: str):
        def fn(mod, inputs, output):
            if name in busy:
                return
            signal[name] += float(output.float().pow(2).sum())
            x = inputs[0]
            how = layer_type(mod).inputs  # the module's own type (an embedding tied to a linear unit counts)
            if how == "lookup":
                stats.setdefault(name, _Counts(mod.weight.shape[0], x.device)).observe(x)
            elif how == "call":
                busy.add(name)
                w = mod.weight
                bias = getattr(mod, "bias", None)  # a registered type may have none
                zero = {"bias": torch.zeros_like(bias)} if isinstance(bias, torch.Tensor) else {}
                for opt in (o for o in options if quantizer.takes(owner[name], o)):
                    err = functional_call(mod, {**zero, "weight": quantizer.quantize(owner[name], opt) - w}, inputs)
                    key = (name, opt.name)
                    conv_noise[key] = conv_noise.get(key, 0.0) + float(err.float().pow(2).sum())
                busy.discard(name)
            else:
                if name not in stats:
                    stats[name] = linear_stats(name, x)
                if not (last[0] is x and last[1] is stats[name]):  # a sibling added this very tensor already
                    stats[name].observe(x)
                last[0], last[1] = x, stats[name]

        return fn

    with hooked(modules[n].register_forward_hook(hook(n)) for n in owner):
        for batch in tqdm(batches, desc="sqnr", disable=not progress, leave=False):
            last[0] = last[1] = None
            raw_call(model, batch)
    rows = []
    for unit in tqdm(units, desc="sqnr options", disable=not progress, leave=False):
        w = unit.weight
        energy = dot64(w)
        for opt in options:
            if not quantizer.takes(unit, opt):  # no row in the table
                rows.append({"layer": unit.name, "option": opt.name, "output_nsr": NAN, "weight_nsr": NAN})
                continue
            delta = quantizer.error(unit, opt)
            ratio = 0.0
            for name in unit.names:  # an embedding alias reads the same (vocab, hidden) rows as its lm_head
                if name in stats:
                    noise = stats[name].noise(delta, opt.name)
                else:
                    noise = conv_noise.get((name, opt.name), 0.0)
                ratio += noise / signal[name] if signal[name] > 0 else 0.0
            w_ratio = dot64(delta) / energy if energy > 0 else 0.0
            rows.append(
                {
                    "layer": unit.name,
                    "option": opt.name,
                    "output_nsr": ratio,
                    "sqnr_db": _db(ratio),
                    "weight_nsr": w_ratio,
                    "sqnr_weight_db": _db(w_ratio),
                }
            )
    return pd.DataFrame(rows)


class SQNR(Estimator):
    """Output SQNR per (layer, option): 10 log10(||Y||^2 / ||Y_q - Y||^2) over calibration batches.

    damage = noise-to-signal power ratio 10^(-SQNR/10): every layer's relative output noise counts alike.
    ``method``: how linear maps get their output noise (see ``noise_ratios``): "auto" (per layer, by memory
    and time), "gram" or "direct" (same numbers, up to float32 rounding).
    Columns: ``sqnr_db`` (output), ``sqnr_weight_db`` (weights), ``output_nsr``, ``weight_nsr``.
    """

    name = "sqnr"
    memory_hint = "pass method='direct' (no input statistics kept) or use smaller calibration batches"
    _parameter_constraints = {"method": [OneOf(("auto", "gram", "direct"))], "progress": [bool]}

    def __init__(self, method: str = "auto", progress: bool = True) -> None:
        self.method = method
        self.progress = progress

    def _estimate(self, model, batches, layers: list[LayerInfo], options, objective: Objective, quantizer):
        frame = noise_ratios(model, batches, units_for(model, layers), options, quantizer, self.progress, self.method)
        return frame.assign(damage=frame["output_nsr"])
