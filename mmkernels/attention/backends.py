"""The attention backends: what each one supports, and why it cannot serve a given call.

Priority for auto-selection (first capable wins): CUDA tensors -> cuda, triton, reference;
CPU tensors -> cpu, reference. The Triton backend also runs CPU tensors under
``TRITON_INTERPRET=1``, but only when asked for explicitly (that is how it is tested without a GPU).
"""
from __future__ import annotations

import importlib
from typing import List

from .. import _dispatch
from . import reference
from .api import OP, AttentionCall

MAX_HEAD_DIM = 256


def _module(name):
    return importlib.import_module(f"mmkernels.attention.{name}")


def _head_dim_reasons(call: AttentionCall) -> List[str]:
    reasons = []
    for label, d in (("head dim D", call.head_dim), ("value head dim Dv", call.head_dim_v)):
        if d % 8 or not 8 <= d <= MAX_HEAD_DIM:
            reasons.append(f"{label}={d} is not a multiple of 8 in [8, {MAX_HEAD_DIM}]")
    return reasons


# --- reference -------------------------------------------------------------------------------

def _reference_unsupported(call: AttentionCall) -> List[str]:
    return []


REFERENCE = _dispatch.Backend(
    name="reference", run=reference.attention_forward, unsupported=_reference_unsupported,
    capabilities={"devices": "any", "dtypes": "float16, bfloat16, float32, float64",
                  "head dims": "any", "notes": "materialises (H, Lq, Lk) per sequence; the spec"})


# --- cpu (C++ extension) ------------------------------------------------------------------------

def _cpu_availability():
    try:
        cpu = _module("cpu")
    except ImportError as exc:
        return False, f"mmkernels.attention.cpu failed to import ({exc})"
    if cpu.is_available():
        return True, ""
    return False, f"the C++ extension mmkernels._C is not built ({cpu.LOAD_ERROR})"


def _cpu_unsupported(call: AttentionCall) -> List[str]:
    reasons = []
    if call.device_type != "cpu":
        reasons.append(f"runs CPU tensors only, got {call.device_type}")
    if call.dtype_name == "float16":
        reasons.append("float16 is not supported on CPU (no AVX512-FP16 here); use bfloat16 or float32")
    elif call.dtype_name not in ("float32", "bfloat16"):
        reasons.append(f"dtype {call.dtype_name} not supported (float32, bfloat16)")
    return reasons + _head_dim_reasons(call)


def _cpu_run(*args):
    return _module("cpu").attention_forward(*args)


CPU = _dispatch.Backend(
    name="cpu", run=_cpu_run, unsupported=_cpu_unsupported, availability=_cpu_availability,
    auto_devices=("cpu",),
    capabilities={"devices": "cpu", "dtypes": "float32, bfloat16",
                  "head dims": "multiples of 8 in [8, 256]",
                  "notes": "OpenMP; AVX-512(+BF16) / AVX2 / scalar chosen at run time"})


# --- triton ---------------------------------------------------------------------------------

def _triton_availability():
    try:
        triton_mod = _module("triton")
    except ImportError as exc:  # triton itself missing
        return False, f"triton is not importable ({exc})"
    return triton_mod.is_available()


def _triton_unsupported(call: AttentionCall) -> List[str]:
    if call.device_type not in ("cpu", "cuda"):
        return [f"runs CUDA tensors only (CPU under TRITON_INTERPRET=1), got {call.device_type}"]
    import torch
    dtype = getattr(torch, call.dtype_name)
    ok, why = _module("triton").supports(dtype, call.head_dim, call.head_dim_v, call.device_type)
    return [] if ok else [why]


def _triton_run(*args):
    return _module("triton").attention_forward(*args)


TRITON = _dispatch.Backend(
    name="triton", run=_triton_run, unsupported=_triton_unsupported,
    availability=_triton_availability, auto_devices=("cuda",),
    capabilities={"devices": "cuda (cpu under TRITON_INTERPRET=1)",
                  "dtypes": "float16, bfloat16, float32", "head dims": "multiples of 8 in [8, 256]",
                  "notes": "FlashAttention-2 style forward + score pass reusing the LSE"})


# --- cuda -------------------------------------------------------------------------------------

def _cuda_availability():
    return False, "no CUDA C++ attention kernel yet (Triton serves CUDA tensors)"


def _cuda_run(*args):  # pragma: no cover - never selected while unavailable
    raise RuntimeError("the CUDA attention backend has no kernel yet")


CUDA = _dispatch.Backend(
    name="cuda", run=_cuda_run, unsupported=lambda call: [], availability=_cuda_availability,
    auto_devices=("cuda",), capabilities={"devices": "cuda", "dtypes": "-", "head dims": "-",
                                          "notes": "build path + nvcc compile gate only"})

# Registration order is the auto-selection priority.
for _backend in (CUDA, TRITON, CPU, REFERENCE):
    _dispatch.register(OP, _backend)
