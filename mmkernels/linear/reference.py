"""Reference dense linear (plain PyTorch): the spec the CPU kernel must match.

``linear_reference(x, weight, bias=None)``: ``x (..., K)``, ``weight (N, K)`` and ``bias (N,)`` of
one floating dtype; returns ``x @ weight.T + bias`` as ``(..., N)`` in that dtype, computed by
``torch.nn.functional.linear`` (float64 inputs: the test oracle). NaN / inf follow IEEE arithmetic
(a NaN in a row of ``x`` makes that output row NaN; a NaN in a row of ``weight`` makes that output
column NaN; ``±inf`` gives ``±inf`` or NaN as the sums give).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)
