"""Reference dense linear (plain PyTorch): the spec the CPU kernel must match.

``linear_reference(x, weight, bias=None, activation=None)``: ``x (..., K)``, ``weight (N, K)`` and
``bias (N,)`` of one floating dtype; returns ``act(x @ weight.T + bias)`` as ``(..., N)`` in that
dtype, computed by ``torch.nn.functional.linear`` and then torch's activation (float64 inputs: the
test oracle). ``activation`` is None or a name of :data:`ACTIVATIONS`:

* ``"relu"``: ``max(y, 0)``;
* ``"gelu"``: ``y / 2 * (1 + erf(y / sqrt 2))`` (``F.gelu``; HF ``"gelu"``);
* ``"gelu_tanh"``: ``y / 2 * (1 + tanh(sqrt(2 / pi) * (y + 0.044715 y^3)))``
  (``F.gelu(approximate="tanh")``; HF ``"gelu_new"``, ``"gelu_pytorch_tanh"``, ``"gelu_fast"``);
* ``"quick_gelu"``: ``y * sigmoid(1.702 y)`` (CLIP);
* ``"silu"``: ``y * sigmoid(y)`` (Llama's gate).

NaN / inf follow IEEE arithmetic (a NaN in a row of ``x`` makes that output row NaN; a NaN in a row
of ``weight`` makes that output column NaN; ``±inf`` gives ``±inf`` or NaN as the sums give); an
activation keeps NaN (docs/nan_semantics.md has the ``±inf`` cases).
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

# The C++ kernel's codes (csrc/cpu/qmatmul.h: Act).
ACTIVATION_CODES: Dict[Optional[str], int] = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "quick_gelu": 4, "silu": 5}


def linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    y = F.linear(x, weight, bias)
    return y if activation is None else ACTIVATIONS[activation](y)
