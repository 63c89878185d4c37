"""mmkernels: fast kernels for multimodal transformers.

Public API (flat): ``attention``, ``AttentionOutput``, the token-reduction primitives
``tome_plan``/``tome_merge``/``tome_unmerge``/``select_tokens``/``gather_tokens``; modules in
``mmkernels.nn``.
"""
from ._dispatch import NoBackendError
from .attention import AttentionOutput, attention, reference_attention
from .quant import QuantizedWeight, qmatmul, quantize_weight
from .reduce import (TomePlan, gather_tokens, select_tokens, tome_merge, tome_plan,
                     tome_unmerge)

__version__ = "0.1.0"
__all__ = ["attention", "AttentionOutput", "reference_attention", "NoBackendError",
           "tome_plan", "tome_merge", "tome_unmerge", "TomePlan", "select_tokens", "gather_tokens",
           "qmatmul", "quantize_weight", "QuantizedWeight", "__version__"]
from .quant import quantize_model, tune_scales  # noqa: E402

__all__ += ["quantize_model", "tune_scales"]
from .quant import export_onnx, load_quantized, save_quantized  # noqa: E402

__all__ += ["save_quantized", "load_quantized", "export_onnx"]
from .hf import PatchReport, patch, patched, unpatch  # noqa: E402

__all__ += ["patch", "unpatch", "patched", "PatchReport"]
from .quant.cpu import clear_caches  # noqa: E402

__all__ += ["clear_caches"]
