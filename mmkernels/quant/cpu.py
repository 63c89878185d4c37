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
layouts are cached here, keyed weakly on the ``qweight`` tensor object (an entry dies with its
weight). An entry remembers the version counters (and identities) of ``qweight``, ``scales`` and
``zeros``; an in-place change of any of them (``copy_``, ``load_state_dict``, ...) rebuilds it on
the next call. Writes that bypass the version counter are not seen: through ``.numpy()`` (or an
array it came from via ``torch.from_numpy``), DLPack, raw pointers, shared memory written by
another process, and any in-place change of a tensor created under ``torch.inference_mode()``
(no version counter). Call :func:`clear_caches` (``mmkernels.clear_caches()``) after such a write.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

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


# --- prepacked-weight cache -------------------------------------------------------------------

# id(qweight) -> (weak reference to qweight, {kind: entry}). A plain dict read without the lock
# (a dict lookup is atomic): torch's WeakIdKeyDictionary built a reference object per lookup,
# ~1 us of a ~25 us small W8A8 call. The reference's callback drops the slot when its weight dies;
# the identity check on hit guards against a new tensor reusing a dead one's id before that.
_CACHE: Dict[int, tuple] = {}
_LOCK = threading.Lock()


def _version(t: Optional[Tensor]):
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _stamp(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor]) -> tuple:
    """What must be unchanged for a cache entry to stay valid."""
    return (_version(qweight), _version(scales), _version(zeros), qweight.data_ptr(), tuple(qweight.shape))


def _entries(qweight: Tensor) -> Optional[dict]:
    slot = _CACHE.get(id(qweight))
    return slot[1] if slot is not None and slot[0]() is qweight else None


def _forget(key: int, ref: weakref.ref) -> None:
    # No lock: a weight can die (and this run) anywhere, even inside a `with _LOCK` block. A race
    # with a new slot for a reused id can only drop that slot: a cache miss, never a wrong hit.
    slot = _CACHE.get(key)
    if slot is not None and slot[0] is ref:
        _CACHE.pop(key, None)


def _packed(ops, kind: str, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int) -> Tuple[Tensor, ...]:
    stamp = _stamp(qweight, scales, zeros)
    entries = _entries(qweight)
    hit = entries.get(kind) if entries is not None else None
    if hit is not None:
        scales_ref, zeros_ref, old_stamp, tensors = hit
        if (
            old_stamp == stamp
            and scales_ref() is scales
            and (zeros_ref() is zeros if zeros is not None else zeros_ref is None)
        ):
            return tensors
    q, s = qweight.contiguous(), scales.contiguous()
    z = zeros.contiguous() if zeros is not None else None
    if kind == "wo":
        tensors = tuple(ops.qmatmul_prepack_wo(q, s, z, bits))
    else:
        tensors = tuple(ops.qmatmul_prepack_a8(q, s, z))
    entry = (weakref.ref(scales), weakref.ref(zeros) if zeros is not None else None, stamp, tensors)
    key = id(qweight)
    with _LOCK:
        entries = _entries(qweight)
        if entries is None:
            entries = {}
            _CACHE[key] = (weakref.ref(qweight, lambda ref, key=key: _forget(key, ref)), entries)
        entries[kind] = entry
    return tensors


def is_cached(qweight: Tensor) -> bool:
    """Whether ``qweight`` has a prepacked layout in the cache now."""
    return _entries(qweight) is not None


def clear_cache() -> None:
    """Drop every cached prepacked weight (rebuilt on the next call)."""
    with _LOCK:
        _CACHE.clear()


def clear_caches() -> None:
    """Drop every cache mmkernels keeps of data derived from your tensors; exported as
    ``mmkernels.clear_caches()``. Today that is the CPU qmatmul backend's prepacked weights
    (rebuilt on the next call, a one-off cost per weight).

    Why it exists: a cached entry is reused while its weight tensors keep their identity, data
    pointer and autograd version counter (``tensor._version``), which every in-place torch op
    (``copy_``, ``mul_``, ``load_state_dict``, ...) bumps. Writes that bypass the version counter
    are invisible to the cache, and the next call would compute with the old weight:

    * through ``.numpy()`` (``qweight.numpy()[...] = ...``), or a NumPy array the tensor shares
      memory with (``torch.from_numpy``), DLPack, ``data_ptr()`` / ctypes, or shared memory
      written by another process;
    * any in-place change of a tensor created under ``torch.inference_mode()`` (it has no
      version counter).

    Call ``mmkernels.clear_caches()`` after such a write. Thread-safe; never needed after torch
    in-place ops or ``load_state_dict``.
    """
    clear_cache()


def cache_size() -> int:
    """Number of weights with a cached prepacked layout (for tests)."""
    with _LOCK:
        return len(_CACHE)


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
) -> Tensor:
    """Same contract as ``reference.qmatmul_tensors`` (argument checks are done by api.py)."""
    ops = _EXT.require(REQUIRED_OP)
    k = x.shape[-1]
    n = qweight.shape[0]
    if qweight.dtype not in (torch.int8, torch.uint8) or (act_bits is not None and k > W8A8_MAX_K):
        return reference.qmatmul_tensors(x, qweight, scales, zeros, bits, bias, act_bits, smooth)
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
        _EXT.kernel("qmatmul_w8a8")(x2, q, s, z, _f32(bias), _f32(smooth), *packed, out)
    else:
        packed = _packed(ops, "wo", qweight, scales, zeros, bits) if m >= GEMM_MIN_M else (None,) * 3
        _EXT.kernel("qmatmul_wo")(x2, q, s, z, bits, _f32(bias), _f32(smooth), *packed, out)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)
