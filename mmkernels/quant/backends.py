"""Backends of ``qmatmul``, declared as data (mmkernels._dispatch.Backend) and registered in
priority order (first capable wins).

CPU tensors -> cpu (the C++ kernels of mmkernels._C, float32 / bfloat16 / float16 ``x``; float16
widened to float32 with F16C, float32 math, rounded to float16), torch (W8A8 int8 through
``torch._int_mm``, bit-identical to the reference: it takes the W8A8 calls the cpu backend
cannot), reference. float64 ``x`` goes to the reference (the test oracle).
CUDA tensors -> cuda (int4 weight-only fp16 / bf16 decode GEMV of csrc/cuda/qgemv_int4.cu, when
mmkernels._cuda is built), triton (every format), reference. The Triton backend also runs CPU
tensors under ``TRITON_INTERPRET=1`` when asked for explicitly (``backend="triton"``): that is how
it is tested without a GPU.
"""

from __future__ import annotations

import importlib
from typing import List

from .. import _calibration, _dispatch
from .._extension import CPU as _EXT
from .._extension import cpu_class

OP = "qmatmul"

_dispatch.define_op(
    OP,
    dtype_label="x dtype",
    features={
        "int4": lambda c: c.bits == 4 and not c.fp8,
        "int8": lambda c: c.bits == 8 and not c.fp8,
        "fp8": lambda c: bool(c.fp8),
        "w8a8": lambda c: bool(c.act_bits),
        "asym": lambda c: not c.symmetric,
        "groups": lambda c: bool(c.group_size),
        "smooth": lambda c: bool(c.smooth),
    },
)


# --- cuda (C++ / CUDA extension mmkernels._cuda) -------------------------------------------------


def _cuda_availability():
    return importlib.import_module("mmkernels.quant.cuda").availability()


CUDA = _dispatch.Backend(
    "cuda",
    "mmkernels.quant.cuda:qmatmul",
    devices=("cuda",),
    dtypes=("float16", "bfloat16"),
    features=("int4", "asym", "groups", "smooth"),
    feature_notes={
        "int8": "int8 weights are not supported (int4 only)",
        "fp8": "fp8 weights are not supported (int4 only; the triton backend serves fp8)",
        "w8a8": "act_bits=8 (W8A8) is not supported (weight-only)",
    },
    availability=_cuda_availability,
    notes="int4 weight-only decode GEMV (M <= 8; larger M goes to the Triton GEMM): 128-bit "
    "weight loads, LOP3 / magic-number dequantization, fp32 accumulation, warp-shuffle "
    "reduction",
)


# --- triton -----------------------------------------------------------------------------------


def _triton_availability():
    from .._triton_support import is_available

    return is_available()


def _triton_check(call) -> List[str]:
    """What the declarations cannot say: the interpreter mode fixed at import, the GPU's generation."""
    mod = importlib.import_module("mmkernels.quant.triton")
    if call.device_type == "cpu" and not mod._module_is_interpreted():
        return ["CPU tensors need TRITON_INTERPRET=1 set before triton is first imported"]
    if call.device_type == "cuda" and not mod.interpreter_active():
        import torch

        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return [f"needs a GPU of compute capability >= 8.0, got {major}.{minor}"]
    return []


TRITON = _dispatch.Backend(
    "triton",
    "mmkernels.quant.triton:qmatmul",
    devices=("cuda", "cpu"),
    auto_devices=("cuda",),
    dtypes=("float16", "bfloat16", "float32"),
    dtype_notes={"float64": "x dtype float64 not supported (float16, bfloat16, float32; float64 is the reference's)"},
    check=_triton_check,
    availability=_triton_availability,
    devices_note="cpu under TRITON_INTERPRET=1, when asked for",
    notes="weight-only int8 / int4 / fp8 (any group, sym / asym): dequantizing GEMM (M >= 16) and "
    "split-K GEMV (M < 16); W8A8 int8 / fp8: fused per-token activation quantization + int8 "
    "(IMMA / IGMMA) or fp8 dot (QGMMA on sm_90, fp16-decoded on sm_80) with the scale / bias "
    "epilogue",
)


# --- cpu (C++ extension) ----------------------------------------------------------------------

CPU = _dispatch.Backend(
    "cpu",
    "mmkernels.quant.cpu:qmatmul",
    devices=("cpu",),
    dtypes=("float32", "bfloat16", "float16"),
    dtype_notes={
        "float64": "float64 is served by the reference (the test oracle; the kernels compute in float32)",
    },
    features=("int4", "int8", "w8a8", "asym", "groups", "smooth"),
    feature_notes={"fp8": "fp8 (e4m3) weights have no CPU kernel (the reference serves them)"},
    availability=lambda: _EXT.availability("qmatmul_wo"),
    notes="weight-only int4 / int8: row-dot GEMV for M < 16 on the stored layout, GEMM on a cached "
    "prepacked layout for M >= 16 (fp32 FMA, or bf16 dot products for bfloat16 x); W8A8: "
    "per-token int8 activations, int32 VNNI dot products on a cached VNNI-blocked weight "
    "(equal to the reference bit for bit); float16 x is widened to float32 with F16C (no "
    "AVX512-FP16 needed), computed in float32 like float32 x, rounded to float16; OpenMP, "
    "AVX-512 / AVX2 / scalar chosen at run time",
)


# --- torch (torch._int_mm: oneDNN, AMX-INT8 where the CPU has it) --------------------------------


def _torch_check(call) -> List[str]:
    if not call.act_bits:
        return ["weight-only calls are not served (mmkernels/quant/int_mm.py says why)"]
    return []


# Measured with `mmkernels bench` (paired rounds): our W8A8 vs torchao's eager W8A8 (quantize +
# torch._int_mm): Intel AMX 1.09-2.8x (M >= 128; 0.79x vs torchao compiled at M=128),
# measurements/intel-amx-2026-12-05.md; AMD Zen 4 1.6-5.3x (README).
def _torch_auto_rule(call):
    """the faster of torch._int_mm and our W8A8 kernel where calibrated (mmkernels._calibration),
    else ours; torch._int_mm when our cpu kernel cannot take the call (it beats the reference)"""
    cpu_reasons = CPU.reasons(call)
    if cpu_reasons:
        return True, "our cpu kernel cannot take it; torch._int_mm beats the reference"
    if call.bucket is not None:
        decision = _calibration.decide(OP, _calibration_bucket(call), lambda: _calibration_contenders(call))
        if decision is not None:
            return decision.winner == "torch", decision.why
    return False, (
        f"our VNNI W8A8 kernel is faster on this {cpu_class()} CPU (Intel AMX: 1.09-2.8x "
        "eager torch._int_mm W8A8; AMD Zen 4: 1.6-5.3x)"
    )


# Calibration times both backends on a synthetic W8A8 problem of the call's bucket: N (down to about
# 256), then M (down to 16 when it is >= 16: the GEMM regime stays) halve until one run is about
# CALIBRATION_MACS multiply-adds per thread (a few ms); K and the call's features stay.
CALIBRATION_MACS = 1 << 26


def _calibration_bucket(call) -> str:
    m, k, n = call.bucket
    extras = ("" if call.symmetric else ", asym") + (", smooth" if call.smooth else "")
    return f"{call.dtype_name}, M~{m}, K={k}, N={n}{extras}"


def _calibration_sizes(call):
    """(M, K, N) of the synthetic problem for ``call``'s bucket."""
    return _calibration.gemm_problem(*call.bucket, CALIBRATION_MACS)


def _calibration_contenders(call):
    import torch

    from .api import qmatmul
    from .quantize import quantize_weight

    m, k, n = _calibration_sizes(call)
    g = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(n, k, generator=g), 8, symmetric=call.symmetric)
    x = torch.randn(m, k, generator=g).to(getattr(torch, call.dtype_name))
    smooth = torch.rand(k, generator=g) + 0.5 if call.smooth else None

    def contender(name):
        return lambda: qmatmul(x, qw, act_bits=8, smooth=smooth, backend=name)

    return {"cpu": contender("cpu"), "torch": contender("torch")}


TORCH = _dispatch.Backend(
    "torch",
    "mmkernels.quant.int_mm:qmatmul",
    devices=("cpu",),
    dtypes=("float32", "bfloat16", "float16"),
    dtype_notes={"float64": "float64 is the reference's (the test oracle)"},
    features=("int8", "w8a8", "asym", "smooth"),
    feature_notes={
        "int4": "int4 weights are not served",
        "fp8": "fp8 weights are not served (the reference serves them)",
        "groups": "grouped scales are not served",
    },
    check=_torch_check,
    auto_rule=_torch_auto_rule,
    notes="W8A8 int8: the reference's per-token activation quantization, torch._int_mm (exact "
    "int32 products; asym weights shifted to int8 and corrected exactly), the reference's "
    "epilogue: equal to the reference bit for bit",
)


# --- reference --------------------------------------------------------------------------------

REFERENCE = _dispatch.Backend(
    "reference",
    "mmkernels.quant.reference:qmatmul_tensors",
    devices=None,
    notes="plain PyTorch (the spec): dequantize + matmul; W8A8 via exact integer products",
)

# torch is listed before cpu so that its auto rule decides between the two for the calls both can
# serve (it passes them to cpu unless calibration timed torch._int_mm faster on this machine).
for _backend in (CUDA, TRITON, TORCH, CPU, REFERENCE):
    _dispatch.register(OP, _backend)
