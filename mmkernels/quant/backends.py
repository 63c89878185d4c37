"""Backends of ``qmatmul``, registered in priority order (first capable wins).

CPU tensors -> cpu (the C++ kernels of mmkernels._C, float32 / bfloat16 ``x``), reference.
float16 and float64 ``x`` go to the reference (float64 is the test oracle; float16 has no fast
CPU path on CPUs without AVX512-FP16).
CUDA tensors -> cuda (int4 weight-only fp16 / bf16 decode GEMV of csrc/cuda/qgemv_int4.cu, when
mmkernels._cuda is built), triton (every format), reference. The Triton backend also runs CPU
tensors under ``TRITON_INTERPRET=1`` when asked for explicitly (``backend="triton"``): that is how
it is tested without a GPU.
"""
from __future__ import annotations

import importlib
from typing import List

from .. import _dispatch
from . import reference


def _cpu_module():
    return importlib.import_module("mmkernels.quant.cpu")


# --- cuda (C++ / CUDA extension mmkernels._cuda) -------------------------------------------------

def _cuda_module():
    return importlib.import_module("mmkernels.quant.cuda")


def _cuda_availability():
    return _cuda_module().availability()


def _cuda_unsupported(call) -> List[str]:
    return _cuda_module().unsupported(call)


def _cuda_run(*args):
    return _cuda_module().qmatmul(*args)


_dispatch.register("qmatmul", _dispatch.Backend(
    name="cuda", run=_cuda_run, unsupported=_cuda_unsupported, availability=_cuda_availability,
    auto_devices=("cuda",),
    capabilities={"devices": "cuda", "dtypes": "float16, bfloat16", "head dims": "-",
                  "notes": "int4 weight-only decode GEMV (M <= 8; larger M goes to the Triton "
                           "GEMM): 128-bit weight loads, LOP3 / magic-number dequantization, fp32 "
                           "accumulation, warp-shuffle reduction"}))


# --- triton -----------------------------------------------------------------------------------

def _triton_module():
    return importlib.import_module("mmkernels.quant.triton")


def _triton_availability():
    try:
        mod = _triton_module()
    except ImportError as exc:
        return False, f"triton is not importable ({exc})"
    return mod.is_available()


def _triton_unsupported(call) -> List[str]:
    import torch

    dtype = getattr(torch, call.dtype_name, None)
    if dtype is None:
        return [f"x dtype {call.dtype_name} not supported"]
    ok, why = _triton_module().supports(dtype, call.device_type)
    return [] if ok else [why]


def _triton_run(*args):
    return _triton_module().qmatmul(*args)


_dispatch.register("qmatmul", _dispatch.Backend(
    name="triton", run=_triton_run, unsupported=_triton_unsupported,
    availability=_triton_availability, auto_devices=("cuda",),
    capabilities={"devices": "cuda (cpu under TRITON_INTERPRET=1)",
                  "dtypes": "float16, bfloat16, float32", "head dims": "-",
                  "notes": "weight-only int8 / int4 / fp8 (any group, sym / asym): dequantizing "
                           "GEMM (M >= 16) and split-K GEMV (M < 16); W8A8 int8 / fp8: fused "
                           "per-token activation quantization + int8 (IMMA / IGMMA) or fp8 dot "
                           "(QGMMA on sm_90, fp16-decoded on sm_80) with the scale / bias "
                           "epilogue"}))


# --- cpu (C++ extension) ----------------------------------------------------------------------

def _cpu_availability():
    try:
        mod = _cpu_module()
    except ImportError as exc:
        return False, f"mmkernels.quant.cpu failed to import ({exc})"
    if mod.is_available():
        return True, ""
    return False, f"the C++ extension mmkernels._C has no qmatmul kernels ({mod.LOAD_ERROR})"


def _cpu_unsupported(call) -> List[str]:
    return _cpu_module().unsupported(call)


_CPU_QMATMUL = None


def _cpu_run(*args):
    global _CPU_QMATMUL
    if _CPU_QMATMUL is None:            # resolved once: this is on every call's path
        _CPU_QMATMUL = _cpu_module().qmatmul
    return _CPU_QMATMUL(*args)


_dispatch.register("qmatmul", _dispatch.Backend(
    name="cpu", run=_cpu_run, unsupported=_cpu_unsupported, availability=_cpu_availability,
    auto_devices=("cpu",),
    capabilities={"devices": "cpu", "dtypes": "float32, bfloat16 (float16, float64 -> reference)",
                  "head dims": "-",
                  "notes": "weight-only int4 / int8: row-dot GEMV for M < 16 on the stored layout, "
                           "GEMM on a cached prepacked layout for M >= 16 (fp32 FMA, or bf16 "
                           "dot products for bfloat16 x); W8A8: per-token int8 activations, "
                           "int32 VNNI dot products on a cached VNNI-blocked weight (equal to the "
                           "reference bit for bit); OpenMP, AVX-512 / AVX2 / scalar chosen at "
                           "run time"}))

_dispatch.register("qmatmul", _dispatch.Backend(
    name="reference", run=reference.qmatmul_tensors, unsupported=lambda call: [],
    capabilities={"devices": "any", "dtypes": "float32, bfloat16, float16, float64",
                  "head dims": "-",
                  "notes": "plain PyTorch (the spec): dequantize + matmul; W8A8 via exact integer "
                           "products"}))
