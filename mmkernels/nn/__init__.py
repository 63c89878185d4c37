"""Drop-in modules built on mmkernels ops (imports :mod:`mmkernels.quant` and the op families,
never :mod:`mmkernels.compress`)."""

from .attention import Attention
from .linear import Linear
from .quant_linear import QuantLinear
from .split_linear import OutlierSplitLinear

__all__ = ["Attention", "Linear", "QuantLinear", "OutlierSplitLinear"]
