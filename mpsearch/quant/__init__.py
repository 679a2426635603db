"""Quantizer backend: fake quantization of weights and plan application."""

from mpsearch.quant.apply import apply_plan
from mpsearch.quant.formats import minifloat_max, quantize_weight, round_minifloat, sqnr_db

__all__ = ["apply_plan", "minifloat_max", "quantize_weight", "round_minifloat", "sqnr_db"]
