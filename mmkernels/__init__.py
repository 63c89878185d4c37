"""mmkernels: fast kernels for multimodal transformers.

Public API (flat): ``attention``, ``AttentionOutput``, the token-reduction primitives
``tome_plan``/``tome_merge``/``tome_unmerge``/``select_tokens``/``gather_tokens``, ``qmatmul`` and
``quantize_weight`` (op layer, :mod:`mmkernels.quant`), ``linear`` (:mod:`mmkernels.linear`), the compression workflows
``quantize_model``/``tune_scales``/``save_quantized``/``load_quantized``/``export_onnx``
(:mod:`mmkernels.compress`), ``patch`` for transformers models (:mod:`mmkernels.hf`); modules in
``mmkernels.nn``.
"""

from ._dispatch import NoBackendError
from ._version import __version__
from .attention import AttentionOutput, attention, reference_attention
from .compress import export_onnx, load_quantized, quantize_model, save_quantized, tune_scales
from .hf import PatchReport, patch, patched, unpatch
from .linear import linear
from .quant import QuantizedWeight, qmatmul, quantize_weight
from ._packed_cache import clear_caches
from .reduce import TomePlan, gather_tokens, select_tokens, tome_merge, tome_plan, tome_unmerge

__all__ = [
    "attention",
    "AttentionOutput",
    "reference_attention",
    "NoBackendError",
    "tome_plan",
    "tome_merge",
    "tome_unmerge",
    "TomePlan",
    "select_tokens",
    "gather_tokens",
    "qmatmul",
    "linear",
    "quantize_weight",
    "QuantizedWeight",
    "__version__",
    "quantize_model",
    "tune_scales",
    "save_quantized",
    "load_quantized",
    "export_onnx",
    "patch",
    "unpatch",
    "patched",
    "PatchReport",
    "clear_caches",
]
