"""The "torch" backend of ``qmatmul``: W8A8 int8 through ``torch._int_mm`` (oneDNN / AMX-INT8 where
the CPU has it), with the reference's own activation quantization and epilogue.

Same result as ``reference.qmatmul_tensors`` bit for bit: ``x`` (divided by ``smooth``) is quantized
per token by :func:`reference.quantize_activations` itself; the int8 x int8 -> int32 products are
exact; the epilogue is the reference's (``acc * s_x * s_w + bias`` in float32, left to right).
Asymmetric weights (uint8 ``q``, zero points ``z``) are shifted into int8, ``q - 128``, and the
difference is added back exactly: ``x_q . (q - z) = x_q . (q - 128) + (128 - z) * sum(x_q)``.

Weight-only calls are not served: torch's CPU int4 op (``_weight_int4pack_mm_for_cpu``) needs its
own packed layout and bfloat16 scale / zero pairs (an extra rounding of our float32 scales), and
our kernels beat it on both CPU classes (Intel AMX: 1.1-2.0x, measurements/intel-amx-2026-12-05.md),
so converting our format for it is not worth a backend. ``K > 66000`` (int32 overflow possible) and
fp8 weights go to the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._activations import apply_activation
from . import reference
from .cpu import W8A8_MAX_K  # the int32 accumulation bound, one definition for both backends


def _centered_int8(qweight: Tensor, zeros: Optional[Tensor]):
    """(int8 (N, K) weight, int32 (N,) correction factor or None): ``q - z = w8 + corr``."""
    if zeros is None:
        return qweight if qweight.dtype == torch.int8 else qweight.to(torch.int8), None
    w8 = (qweight.to(torch.int16) - 128).to(torch.int8)
    return w8, (128 - zeros.reshape(-1).to(torch.int32))


def qmatmul(
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
    """Same contract as ``reference.qmatmul_tensors``, for W8A8 int8 calls (dispatch checks)."""
    k = x.shape[-1]
    if act_bits is None or qweight.dtype not in (torch.int8, torch.uint8) or k > W8A8_MAX_K:
        return reference.qmatmul_tensors(x, qweight, scales, zeros, bits, bias, act_bits, smooth, activation)
    c = reference.compute_dtype(x.dtype)
    n = qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(c)
    if smooth is not None:
        x2 = x2 / smooth.to(c)
    xq, sx = reference.quantize_activations(x2)
    w8, corr = _centered_int8(qweight, zeros)
    acc = torch._int_mm(xq, w8.t())
    if corr is not None:
        acc = acc + xq.sum(dim=1, dtype=torch.int32)[:, None] * corr[None, :]
    y = acc.to(c) * sx[:, None] * scales.to(c)[:, 0][None, :]
    if bias is not None:
        y = y + bias.to(c)
    return apply_activation(y, activation).to(x.dtype).reshape(*lead, n)
