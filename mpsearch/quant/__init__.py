"""Quantizer backend: fake quantization of weights and plan application."""

from mpsearch.quant.apply import apply_plan, quantized, swapped
from mpsearch.quant.formats import minifloat_max, quantization_error, quantize_weight, round_minifloat, sqnr_db

__all__ = [
    "apply_plan",
    "minifloat_max",
    "quantization_error",
    "quantize_weight",
    "quantized",
    "round_minifloat",
    "sqnr_db",
    "swapped",
]
