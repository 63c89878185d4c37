"""Reference quantized matmul (plain PyTorch): the spec that compiled kernels must match.

``qmatmul_reference(x, qw, bias=None, act_bits=None, smooth=None, activation=None)`` with
``x (..., K)`` and a :class:`QuantizedWeight` ``qw`` of shape ``(N, K)`` returns ``(..., N)`` in
``x.dtype``. ``activation`` (None or a name of ``mmkernels._activations.ACTIVATIONS``) is applied
to ``y`` below in ``c``, before the cast to ``x.dtype``.

Compute dtype ``c``: float32 for float16 / bfloat16 / float32 inputs, float64 for float64 inputs.
``x`` is first divided by ``smooth`` (``(K,)`` SmoothQuant factors; the weight must have been
multiplied by the same factors, ``quantize_weight(W * smooth)``, so that ``(x / s) @ (W * s).T``
equals ``x @ W.T``).

* Weight-only (``act_bits=None``): ``y = x_c @ W_hat.T + bias``, ``W_hat = qw.dequantize(c)``.
* W8A8 (``act_bits=8``, int8 per-channel weights): dynamic per-token symmetric activation
  quantization of each row ``t`` of ``x`` (flattened to ``(M, K)``)::

      s_x[t] = max_k |x[t, k]| / 127            (1 if the row is all zero, NaN if it holds a NaN or ±inf)
      x_q[t] = clamp(round(x[t] / s_x[t]), -127, 127)          round half to even, in c
      acc    = x_q @ (q_w - z_w).T                              exact integer dot products
      y      = acc * s_x[:, None] * s_w[None, :] + bias         in c, left to right

* fp8 W8A8 (``act_bits=8`` with an fp8 weight): per-token float8 e4m3 activations,
  ``s_x[t] = max_k |x[t, k]| / 448`` (1 if zero), ``x_q = float8_e4m3fn(x / s_x)`` (ties to even),
  ``y = (x_q @ q_w.T) * s_x * s_w + bias`` with the e4m3 values widened to ``c`` (every product of
  two e4m3 values is exact in float32; sums are rounded as ``c`` does).

  NaN / inf: a row of ``x / smooth`` that holds a NaN or ``±inf`` gets ``s_x = NaN`` (W8A8, int8
  and fp8), so its output row is NaN; its ``x_q`` is 0. Weight-only products follow IEEE arithmetic
  (a NaN in a row makes that output row NaN; ``±inf`` gives ``±inf`` or NaN as the sums give). A
  zero in ``smooth`` divides by zero like any other value (``±inf`` / NaN activations, then the rules
  above): every backend gives the same result. docs/nan_semantics.md.

  ``acc`` is computed here in int64, which equals int32 accumulation whenever it cannot overflow
  (``K * 127 * 255 < 2**31``, i.e. ``K <= 66 311``); kernels accumulate in int32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._activations import apply_activation
from .packing import FP8_DTYPE, FP8_MAX, QuantizedWeight, centered_weight, dequantize_tensors, is_fp8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize_activations(x2: Tensor) -> tuple:
    """Per-token symmetric int8: ``(x_q int8 (M, K), s_x (M,))`` for a 2-D float ``x2`` (already in
    the compute dtype)."""
    amax = x2.abs().amax(dim=1)
    scale = _scale(amax, 127)
    xq = torch.clamp(torch.round(x2 / scale[:, None]), -127, 127)
    return _zero_nonfinite_rows(xq, scale).to(torch.int8), scale


def _scale(amax: Tensor, qmax: float) -> Tensor:
    """``amax / qmax``; 1 for an all-zero row, NaN for a row holding a NaN or ±inf (amax NaN/inf)."""
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.where(torch.isfinite(amax), scale, torch.full_like(amax, float("nan")))


def _zero_nonfinite_rows(xq: Tensor, scale: Tensor) -> Tensor:
    """x_q of the rows whose scale is NaN: 0 (their output is NaN whatever x_q is)."""
    return torch.where(torch.isfinite(scale)[:, None], xq, torch.zeros_like(xq))


def quantize_activations_fp8(x2: Tensor) -> tuple:
    """Per-token float8 e4m3: ``(x_q float8_e4m3fn (M, K), s_x (M,))`` for a 2-D float ``x2``."""
    amax = x2.abs().amax(dim=1)
    scale = _scale(amax, FP8_MAX)
    xq = (x2 / scale[:, None]).to(torch.float32).clamp(-FP8_MAX, FP8_MAX)
    return _zero_nonfinite_rows(xq, scale).to(FP8_DTYPE), scale


def qmatmul_tensors(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    bits: int,
    bias: Optional[Tensor] = None,
    act_bits: Optional[int] = None,
    smooth: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Tensor-level form of :func:`qmatmul_reference` (what the custom op and backends receive)."""
    c = compute_dtype(x.dtype)
    n = qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(c)
    if smooth is not None:
        x2 = x2 / smooth.to(c)
    if act_bits is None:
        y = x2 @ dequantize_tensors(qweight, scales, zeros, bits, c).T
    elif is_fp8(qweight):
        xq, sx = quantize_activations_fp8(x2)
        acc = xq.to(c) @ qweight.to(c).T
        y = acc * sx[:, None] * scales.to(c)[:, 0][None, :]
    else:
        xq, sx = quantize_activations(x2)
        wc = centered_weight(qweight, zeros, bits).to(torch.int64)
        acc = xq.to(torch.int64) @ wc.T
        y = acc.to(c) * sx[:, None] * scales.to(c)[:, 0][None, :]
    if bias is not None:
        y = y + bias.to(c)
    return apply_activation(y, activation).to(x.dtype).reshape(*lead, n)


def qmatmul_reference(
    x: Tensor,
    qw: QuantizedWeight,
    bias: Optional[Tensor] = None,
    act_bits: Optional[int] = None,
    smooth: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """``act(x (..., K) @ W_hat.T + bias) -> (..., N)``; see the module docstring. No argument
    checks (``mmkernels.qmatmul`` does them)."""
    return qmatmul_tensors(x, qw.qweight, qw.scales, qw.zeros, qw.bits, bias, act_bits, smooth, activation)
