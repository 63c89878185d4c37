"""How argument errors and call descriptions name a dtype and a tensor: one wording for every op."""

from __future__ import annotations

import torch
from torch import Tensor


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


def describe(t: Tensor) -> str:
    """``"float32[2, 3] on cpu"``."""
    return f"{dtype_name(t.dtype)}{list(t.shape)} on {t.device}"
