"""Fake quantization of weight tensors: quantize then dequantize, returning a float tensor of the same shape.

Dim 0 is the output channel. Per-channel options use one scale per output channel; group-wise options split
each output channel's flattened row into groups of ``group_size`` (the last group is zero-padded).
"""

from __future__ import annotations

import math

import torch

from mpsearch.core.options import Option, parse_option

_FP8_DTYPES = {(4, 3): torch.float8_e4m3fn, (5, 2): torch.float8_e5m2}


def minifloat_max(exponent_bits: int, mantissa_bits: int) -> float:
    """Largest finite value. e4m3 follows the OCP 'fn' variant (no inf, 448); others are IEEE-like."""
    bias = 2 ** (exponent_bits - 1) - 1
    if (exponent_bits, mantissa_bits) == (4, 3):
        return 448.0
    if exponent_bits == 2 and mantissa_bits == 1:  # e2m1 has no inf/nan: top exponent is a normal value
        return 6.0
    top = 2**exponent_bits - 2 - bias
    return (2 - 2.0**-mantissa_bits) * 2.0**top


def round_minifloat(x: torch.Tensor, exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """Round to the nearest value of a small float format (ties to even), saturating at its max.

    Written by hand because torch can cast to FP8 but has no CPU cast to FP4 (float4_e2m1fn_x2 is a packed
    storage type only). Tested against torch's float8 casts so that the FP4 path is trusted.
    """
    bias = 2 ** (exponent_bits - 1) - 1
    fmax = minifloat_max(exponent_bits, mantissa_bits)
    mag = x.abs().clamp(max=fmax)
    exp = torch.floor(torch.log2(mag.clamp(min=torch.finfo(torch.float32).tiny)))
    exp = exp.clamp(min=1 - bias)  # below the smallest normal the spacing is fixed (subnormals)
    step = torch.exp2(exp - mantissa_bits)
    return torch.sign(x) * (torch.round(mag / step) * step).clamp(max=fmax)


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    rows = w.reshape(w.shape[0], -1).float()
    row_len = rows.shape[1]
    if group_size is None:
        return rows.unsqueeze(1), row_len
    n_groups = math.ceil(row_len / group_size)
    pad = n_groups * group_size - row_len
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], n_groups, group_size), row_len


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored as fp16: round them, and keep them non-zero."""
    scale = scale.half().float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _absmax(g: torch.Tensor) -> torch.Tensor:
    """max |g| over the last dim, without an |g| temporary."""
    return torch.maximum(g.amax(-1, keepdim=True), -g.amin(-1, keepdim=True))


def int_grid(g: torch.Tensor, opt: Option) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale, zero point) of mpsearch's integer grid for each group along g's last dim (kept, size 1):
    symmetric, zero 0 and levels -2^(b-1) .. 2^(b-1) - 1; asymmetric, levels 0 .. 2^b - 1. The one grid of
    round to nearest and of GPTQ's column loop (``mpsearch.runtimes.native.IntGrid``)."""
    if opt.symmetric:
        scale = _fp16_scale(_absmax(g) / (2 ** (opt.bits - 1) - 1))
        return scale, torch.zeros_like(scale)
    levels = 2**opt.bits - 1
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = _fp16_scale((hi - lo) / levels)
    return scale, torch.clamp(torch.round(-lo / scale), 0, levels)


def _int_quant(g: torch.Tensor, opt: Option) -> torch.Tensor:
    # in-place steps on one new tensor: a weight-sized temporary, not one per operation
    scale, zero = int_grid(g, opt)
    if opt.symmetric:
        qmax = 2 ** (opt.bits - 1) - 1
        return (g / scale).round_().clamp_(-qmax - 1, qmax).mul_(scale)
    return (g / scale).round_().add_(zero).clamp_(0, 2**opt.bits - 1).sub_(zero).mul_(scale)


def _fp_quant(g: torch.Tensor, opt: Option) -> torch.Tensor:
    e, m = opt.exponent_bits, opt.mantissa_bits
    scale = _fp16_scale(_absmax(g) / minifloat_max(e, m))
    scaled = (g / scale).clamp_(-minifloat_max(e, m), minifloat_max(e, m))
    if (e, m) in _FP8_DTYPES:
        return scaled.to(_FP8_DTYPES[(e, m)]).float() * scale
    return round_minifloat(scaled, e, m) * scale


def quantize_weight(w: torch.Tensor, option: Option | str) -> torch.Tensor:
    """Round ``w`` to nearest in ``option``, in its runtime's own math (``mpsearch.runtimes``: bit-exact with the
    runtime's decoder); returns a tensor of w's shape and dtype. This is the ``RTN`` quantizer's math; GPTQ
    and the others are ``mpsearch.quant.quantizer.Quantizer``s."""
    from mpsearch.runtimes import runtime_of

    opt = parse_option(option) if isinstance(option, str) else option
    return runtime_of(opt).quantize(w, opt)


def native_quantize(w: torch.Tensor, opt: Option) -> torch.Tensor:
    """mpsearch's own formats (``mpsearch.runtimes.native``): ints and minifloats with fp16 scales."""
    if opt.kind == "none":
        return w.half().to(w.dtype)
    g, row_len = _grouped(w.detach(), opt.group_size)
    q = _int_quant(g, opt) if opt.kind == "int" else _fp_quant(g, opt)
    q = q.reshape(w.shape[0], -1)[:, :row_len]
    return q.reshape(w.shape).to(w.dtype)


def quantization_error(w: torch.Tensor, option: Option | str) -> torch.Tensor:
    """Q(w) - w in float32 (whatever w's dtype), built in place: one new weight-sized tensor."""
    return quantize_weight(w, option).float().sub_(w)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - approx||^2) in dB (inf when identical)."""
    noise = (reference.double() - approx.double()).pow(2).sum()
    signal = reference.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
