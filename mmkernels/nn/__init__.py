"""Drop-in modules built on mmkernels ops."""
from .attention import Attention

__all__ = ["Attention"]
