"""Quantized matmul: weight formats, quantizers, and ``qmatmul`` (weight-only int8 / int4, W8A8)."""
from . import backends as _backends  # noqa: F401  (registers the backends)
from .api import qmatmul
from .format import QuantizedWeight, pack_int4, unpack_int4
from .metrics import sqnr
from .quantize import quantize_weight, smoothquant_factors
from .reference import qmatmul_reference

__all__ = ["qmatmul", "QuantizedWeight", "quantize_weight", "smoothquant_factors",
           "qmatmul_reference", "sqnr", "pack_int4", "unpack_int4"]
from .gptq import GPTQResult, Hessian, gptq_quantize  # noqa: E402
from .model import quantize_model  # noqa: E402
from .report import LayerReport, QuantizationReport  # noqa: E402

__all__ += ["quantize_model", "gptq_quantize", "GPTQResult", "Hessian", "QuantizationReport",
            "LayerReport"]
from .serialize import QuantizedCheckpoint, load_quantized, save_quantized  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402

__all__ += ["save_quantized", "load_quantized", "QuantizedCheckpoint", "export_onnx"]
from .scale_tuning import tune_scales  # noqa: E402

__all__ += ["tune_scales"]
