"""Reference dense linear (plain PyTorch): the spec the CPU kernel must match.

``linear_reference(x, weight, bias=None, activation=None)``: ``x (..., K)``, ``weight (N, K)`` and
``bias (N,)`` of one floating dtype; returns ``act(x @ weight.T + bias)`` as ``(..., N)`` in that
dtype, computed by ``torch.nn.functional.linear`` and then torch's activation (float64 inputs: the
test oracle). ``activation``: None or a name of ``mmkernels._activations.ACTIVATIONS`` (relu,
gelu, gelu_tanh, quick_gelu, silu; formulas there).

NaN / inf follow IEEE arithmetic (a NaN in a row of ``x`` makes that output row NaN; a NaN in a row
of ``weight`` makes that output column NaN; ``±inf`` gives ``±inf`` or NaN as the sums give); an
activation keeps NaN (docs/nan_semantics.md has the ``±inf`` cases).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.nn import functional as F

from .._activations import apply_activation


def linear_reference(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    return apply_activation(F.linear(x, weight, bias), activation)
