"""Glue from ``linear``'s backend signature to the C++ kernel (``mmkernels_C::linear_f32``,
csrc/cpu/qmatmul_torch.cpp).

The weight is prepacked once (``linear_prepack``: strips of 64 output channels, each the
``(K, 64)`` float32 panel the weight-only GEMM's micro-kernel reads: AVX-512 6 rows x 64 channels,
AVX2 6 x 16, fp32 FMA) and cached per weight tensor (mmkernels._packed_cache: rebuilt after an
in-place change, dropped with the weight; ``mmkernels.clear_caches()`` after writes that bypass the
version counter). No decode, no scaling: the products are the float32 products of ``x`` and the
weight, summed in float32 in blocks of 256 features; the bias and the activation are applied in the
epilogue that stores the output (AVX-512: vectorised erf / exp; other paths: libm in double). On
the scalar path (no SIMD) the kernel is plain loops (correct, slow: auto-selection keeps torch
there).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from .. import _packed_cache
from .._extension import CPU as _EXT
from .._activations import CODES

REQUIRED_OP = "linear_f32"

# MMKERNELS_DEBUG_POISON=1 (the tests' conftest): outputs are NaN-filled before the kernel runs.
_POISON = os.environ.get("MMKERNELS_DEBUG_POISON", "") == "1"


def _packed(weight: Tensor) -> Tensor:
    def build():
        return (_EXT.require(REQUIRED_OP).linear_prepack(weight.detach()),)

    return _packed_cache.packed(weight, "dense_f32", (), build)[0]


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """Same contract as ``reference.linear_reference`` for float32 CPU tensors (checked by api.py);
    the activation runs in the kernel's epilogue, on the float32 sums in registers."""
    kernel = _EXT.kernel(REQUIRED_OP)  # raises when the extension lacks it
    k, n = x.shape[-1], weight.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), k)  # (not -1: K may be 0)
    if k > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if _POISON:
        out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    # no autograd here (plain eager without gradients, or the op's body): the kernel writes into out
    kernel(x2, _packed(weight), b, out, CODES[activation])
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)
