"""Model-compression workflows, above the op layer (:mod:`mmkernels.quant`) and the modules
(:mod:`mmkernels.nn`): calibration, GPTQ, SignRound, SmoothQuant alpha search, end-to-end scale
tuning, ``quantize_model`` and its SQNR report, checkpoints (``save_quantized`` /
``load_quantized``, file layouts in :mod:`.checkpoint`) and ONNX export.

Imports flow one way: ``compress`` -> ``nn`` -> ``quant``; nothing below imports this package
(tests/test_layering.py).
"""

from .gptq import GPTQResult, Hessian, gptq_quantize
from .onnx_export import export_onnx
from .pipeline import quantize_model
from .scale_tuning import tune_scales
from .serialize import QuantizedCheckpoint, load_quantized, save_quantized
from .sqnr_report import LayerReport, QuantizationReport

__all__ = [
    "quantize_model",
    "gptq_quantize",
    "GPTQResult",
    "Hessian",
    "QuantizationReport",
    "LayerReport",
    "save_quantized",
    "load_quantized",
    "QuantizedCheckpoint",
    "export_onnx",
    "tune_scales",
]
