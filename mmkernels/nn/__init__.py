"""Drop-in modules built on mmkernels ops."""
from .attention import Attention
from .quant_linear import QuantLinear

__all__ = ["Attention", "QuantLinear"]
from .split_linear import OutlierSplitLinear  # noqa: E402

__all__ += ["OutlierSplitLinear"]
