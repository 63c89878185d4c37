"""The attention backends, declared as data (mmkernels._dispatch.Backend): the reasons one cannot
serve a call and the rows of ``mmkernels info`` both derive from these declarations.

Priority for auto-selection (first capable wins): CUDA tensors -> cuda, triton, reference;
CPU tensors -> cpu, reference. The Triton backend also runs CPU tensors under
``TRITON_INTERPRET=1``, but only when asked for explicitly (that is how it is tested without a GPU).
"""
from __future__ import annotations

import importlib
from typing import List

from .. import _dispatch
from .._extension import CPU as _EXT
from .api import OP, AttentionCall

MAX_HEAD_DIM = 256
HEAD_DIMS = _dispatch.HeadDims(8, MAX_HEAD_DIM, 8)

_dispatch.define_op(OP, features={
    "varlen": lambda c: c.varlen,
    "causal": lambda c: c.causal,
    "key_bias": lambda c: c.has_bias,
    "scores": lambda c: bool(c.scores),
    "lse": lambda c: c.return_lse,
    "gqa": lambda c: c.num_heads_q != c.num_heads_kv,
})


# --- cuda -------------------------------------------------------------------------------------

def _cuda_availability():
    return False, "no CUDA C++ attention kernel yet (Triton serves CUDA tensors)"


def _cuda_run(*args):  # pragma: no cover - never selected while unavailable
    raise RuntimeError("the CUDA attention backend has no kernel yet")


CUDA = _dispatch.Backend(
    "cuda", _cuda_run, devices=("cuda",), availability=_cuda_availability,
    notes="build path + nvcc compile gate only")


# --- triton -----------------------------------------------------------------------------------

def _triton_availability():
    from .._triton_support import is_available
    return is_available()


def _triton_check(call: AttentionCall) -> List[str]:
    """What the declarations cannot say: the interpreter mode fixed at import, the GPU's limits."""
    mod = importlib.import_module("mmkernels.attention.triton")
    reasons = []
    if call.device_type == "cpu" and not mod._module_is_interpreted(mod):
        reasons.append("CPU tensors need TRITON_INTERPRET=1 set before triton is first imported")
    if (call.device_type == "cuda" and call.dtype_name == "float32"
            and max(call.head_dim, call.head_dim_v) > 128 and not mod.interpreter_active()):
        reasons.append("float32 with head dim > 128 on the GPU (the kernel would spill registers)")
    return reasons


TRITON = _dispatch.Backend(
    "triton", "mmkernels.attention.triton:attention_forward", devices=("cuda", "cpu"),
    auto_devices=("cuda",), dtypes=("float16", "bfloat16", "float32"),
    dtype_notes={"float64": "float64 is the reference's (the test oracle)"},
    head_dims=HEAD_DIMS, check=_triton_check, availability=_triton_availability,
    devices_note="cpu under TRITON_INTERPRET=1, when asked for",
    notes="FlashAttention-2 style forward + score pass reusing the LSE; f32 D > 128 not on the GPU")


# --- cpu (C++ extension) ------------------------------------------------------------------------

CPU = _dispatch.Backend(
    "cpu", "mmkernels.attention.cpu:attention_forward", devices=("cpu",),
    dtypes=("float32", "bfloat16"),
    dtype_notes={"float16": "float16 is not supported on CPU (no AVX512-FP16 here); use bfloat16 "
                            "or float32",
                 "float64": "float64 is the reference's (the test oracle; the kernel computes in "
                            "float32)"},
    head_dims=HEAD_DIMS, availability=lambda: _EXT.availability("attention_fwd"),
    notes="OpenMP; AVX-512(+BF16) / AVX2 / scalar chosen at run time")


# --- reference ------------------------------------------------------------------------------

REFERENCE = _dispatch.Backend(
    "reference", "mmkernels.attention.reference:attention_forward", devices=None,
    notes="materialises (H, Lq, Lk) per sequence; the spec")

# Registration order is the auto-selection priority.
for _backend in (CUDA, TRITON, CPU, REFERENCE):
    _dispatch.register(OP, _backend)
