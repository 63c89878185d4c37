"""The elementwise activations a GEMM applies in its epilogue (the ``activation`` argument of
:func:`mmkernels.linear` and :func:`mmkernels.qmatmul`): their spec in plain PyTorch and the C++
kernels' codes (csrc/cpu/qmatmul.h: ``Act``).

* ``"relu"``: ``max(y, 0)``;
* ``"gelu"``: ``y / 2 * (1 + erf(y / sqrt 2))`` (``F.gelu``; HF ``"gelu"``);
* ``"gelu_tanh"``: ``y / 2 * (1 + tanh(sqrt(2 / pi) * (y + 0.044715 y^3)))``
  (``F.gelu(approximate="tanh")``; HF ``"gelu_new"``, ``"gelu_pytorch_tanh"``, ``"gelu_fast"``);
* ``"quick_gelu"``: ``y * sigmoid(1.702 y)`` (CLIP);
* ``"silu"``: ``y * sigmoid(y)`` (Llama's gate).

NaN stays NaN. At ``±inf`` the C++ epilogues give each formula's IEEE result (docs/nan_semantics.md).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor
from torch.nn import functional as F


def _quick_gelu(y: Tensor) -> Tensor:
    return y * torch.sigmoid(1.702 * y)


def _gelu_tanh(y: Tensor) -> Tensor:
    return F.gelu(y, approximate="tanh")


ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
}

# The C++ kernels' codes (csrc/cpu/qmatmul.h: Act).
CODES: Dict[Optional[str], int] = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "quick_gelu": 4, "silu": 5}


def check_activation(activation) -> None:
    """``TypeError`` / ``ValueError`` naming the argument unless ``activation`` is None or a name
    of :data:`ACTIVATIONS`."""
    if activation is None:
        return
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str or None, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got {activation!r}")


def apply_activation(y: Tensor, activation: Optional[str]) -> Tensor:
    """``activation(y)`` by torch's functions (``y`` itself for None)."""
    return y if activation is None else ACTIVATIONS[activation](y)
