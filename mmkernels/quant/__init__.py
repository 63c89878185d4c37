"""Quantized matmul: weight formats, quantizers, and ``qmatmul`` (weight-only int8 / int4, W8A8)."""
from . import backends as _backends  # noqa: F401  (registers the backends)
from .api import qmatmul
from .format import QuantizedWeight, pack_int4, unpack_int4
from .metrics import sqnr
from .quantize import quantize_weight, smoothquant_factors
from .reference import qmatmul_reference

__all__ = ["qmatmul", "QuantizedWeight", "quantize_weight", "smoothquant_factors",
           "qmatmul_reference", "sqnr", "pack_int4", "unpack_int4"]
