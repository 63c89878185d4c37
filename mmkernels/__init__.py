"""mmkernels: fast kernels for multimodal transformers.

Public API (flat): ``attention``, ``AttentionOutput``; modules in ``mmkernels.nn``.
"""
from ._dispatch import NoBackendError
from .attention import AttentionOutput, attention, reference_attention

__version__ = "0.1.0"
__all__ = ["attention", "AttentionOutput", "reference_attention", "NoBackendError", "__version__"]
