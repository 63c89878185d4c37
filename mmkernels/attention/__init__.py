"""Fused attention: ``attention`` (dense and varlen), per-key ``scores``, ``key_bias``, GQA."""

from . import backends as _backends  # noqa: F401  (registers the backends)
from .api import AttentionOutput, attention, reference_attention

__all__ = ["attention", "AttentionOutput", "reference_attention"]
