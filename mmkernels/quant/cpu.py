"""Glue from ``qmatmul``'s backend signature to the C++ CPU kernels.

The kernels live in the extension ``mmkernels._C`` (csrc/cpu/qmatmul*.cpp, registered as
``torch.ops.mmkernels_C.qmatmul_*``); the code path (AVX-512 with bf16 / VNNI, AVX2, scalar) is
chosen from CPUID on every call and ``MMKERNELS_CPU_ISA`` lowers it.

* Weight-only, ``M < GEMM_MIN_M`` rows (decode): ``qmatmul_wo`` without a prepacked weight runs the
  row-dot kernel straight on the canonical buffers (packing.py): int4 bytes are looked up in a
  16-entry table of the group's dequantized values (low nibbles against x's even features, high
  nibbles against the odd ones), int8 bytes are widened and scaled; OpenMP over output channels.
* Weight-only, ``M >= GEMM_MIN_M``: a prepacked weight (``qmatmul_prepack_wo``: strips of 64 output
  channels, feature pairs interleaved, values made unsigned) is decoded strip by strip into an
  L2-resident panel and a register-tiled micro-kernel runs over it: fp32 FMA on the exact
  dequantized weights, or for bfloat16 ``x`` bf16 dot products (vdpbf16ps) of ``x`` with the exact
  integers ``q - z``, scaled per group in fp32.
* float16 ``x`` (every path above): widened to fp32 with F16C where the kernels read it (exact),
  then the fp32 kernels of float32 ``x`` (never the bf16 dot products: they would round ``x``);
  the output is rounded to float16 (nearest even, NaN kept), as the reference's float32 compute.
* W8A8 (``act_bits=8``): per-token int8 quantization of ``x`` fused into the packing of the
  activation panel (true divisions, round half to even: bit-identical to the reference), int32
  dot products (AVX512-VNNI vpdpbusd; AVX2 vpmaddwd) on a VNNI-blocked prepacked weight
  (``qmatmul_prepack_a8``, with per-channel weight sums for the unsigned-offset compensation), and
  the reference's float epilogue rounded step by step (the result equals the reference's bit for
  bit). ``K > 66000`` could overflow int32 and is left to the reference.

Prepacked-weight cache: the custom op receives the canonical buffers on every call, so the packed
layouts are cached (mmkernels._packed_cache), keyed weakly on the ``qweight`` tensor object with
``scales`` and ``zeros`` as its companions: an in-place change of any of them (``copy_``,
``load_state_dict``, ...) rebuilds the entry on the next call; writes that bypass the version
counter need :func:`clear_caches` (``mmkernels.clear_caches()``).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _packed_cache
from .._activations import CODES
from .._extension import CPU as _EXT
from . import reference

REQUIRED_OP = "qmatmul_wo"

# Weight-only calls with at least this many rows of x run the prepacked GEMM kernel.
GEMM_MIN_M = 16
# W8A8 accumulates in int32: K * 127 * 255 must stay below 2**31.
W8A8_MAX_K = 66000

DTYPES = ("float32", "bfloat16", "float16")


# is_available(), LOAD_ERROR (module attribute) and cpu_isa(), as for every family's glue.
is_available, __getattr__, cpu_isa = _EXT.family_accessors(__name__, REQUIRED_OP, "qmatmul_cpu_isa")


# --- prepacked-weight cache (mmkernels._packed_cache) --------------------------------------------

is_cached = _packed_cache.is_cached
clear_cache = _packed_cache.clear
cache_size = _packed_cache.size
clear_caches = _packed_cache.clear_caches


def _packed(ops, kind: str, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int) -> Tuple[Tensor, ...]:
    def build() -> Tuple[Tensor, ...]:
        q, s = qweight.contiguous(), scales.contiguous()
        z = zeros.contiguous() if zeros is not None else None
        if kind == "wo":
            return tuple(ops.qmatmul_prepack_wo(q, s, z, bits))
        return tuple(ops.qmatmul_prepack_a8(q, s, z))

    return _packed_cache.packed(qweight, kind, (scales, zeros), build)


# --- the backend ------------------------------------------------------------------------------

# MMKERNELS_DEBUG_POISON=1 (set by the tests' conftest before import): outputs are filled with NaN
# before the kernel runs, so an unwritten element shows. Read once: an environment lookup costs
# ~15 us when the caches are cold, a large share of a GEMV.
_POISON = os.environ.get("MMKERNELS_DEBUG_POISON", "") == "1"


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


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
    """Same contract as ``reference.qmatmul_tensors`` (argument checks are done by api.py); the
    activation runs in the kernels' output epilogue, in float32 before the output's rounding."""
    ops = _EXT.require(REQUIRED_OP)
    k = x.shape[-1]
    n = qweight.shape[0]
    if qweight.dtype not in (torch.int8, torch.uint8) or (act_bits is not None and k > W8A8_MAX_K):
        return reference.qmatmul_tensors(x, qweight, scales, zeros, bits, bias, act_bits, smooth, activation)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if k > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if _POISON:
        out = torch.full((m, n), float("nan"), dtype=x.dtype)
    else:
        out = torch.empty((m, n), dtype=x.dtype)
    q = qweight if qweight.is_contiguous() else qweight.contiguous()
    s = scales if scales.is_contiguous() else scales.contiguous()
    z = zeros if zeros is None or zeros.is_contiguous() else zeros.contiguous()
    if act_bits is not None:
        packed = _packed(ops, "a8", qweight, scales, zeros, bits)
        _EXT.kernel("qmatmul_w8a8")(x2, q, s, z, _f32(bias), _f32(smooth), *packed, out, CODES[activation])
    else:
        packed = _packed(ops, "wo", qweight, scales, zeros, bits) if m >= GEMM_MIN_M else (None,) * 3
        _EXT.kernel("qmatmul_wo")(x2, q, s, z, bits, _f32(bias), _f32(smooth), *packed, out, CODES[activation])
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)
