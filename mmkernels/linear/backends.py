"""Backends of ``linear``, declared as data (mmkernels._dispatch.Backend), in priority order.

* torch: ``torch.nn.functional.linear`` (MKL / oneDNN on CPUs, cuBLAS on GPUs), then torch's
  activation; its auto rule decides between it and ours for the calls both can serve.
* cpu: float32 on CPU tensors, the C++ kernel (cpu.py).
* reference: the spec (float64: the test oracle).
"""

from __future__ import annotations

import math
from typing import List, Optional

from torch import Tensor
from torch.nn import functional as F

from .. import _calibration, _dispatch
from .._extension import CPU as _EXT
from .._extension import cpu_class, cpu_family, cpu_vendor
from .._activations import ACTIVATIONS

OP = "linear"

_dispatch.define_op(OP, dtype_label="dtype")

CPU = _dispatch.Backend(
    "cpu",
    "mmkernels.linear.cpu:linear",
    devices=("cpu",),
    dtypes=("float32",),
    dtype_notes={
        "float64": "float64 is served by the reference (the test oracle; the kernel computes in float32)",
        "bfloat16": "bfloat16 is served by torch (oneDNN's bf16 GEMM; our CPU kernel is float32)",
        "float16": "float16 is served by torch (our CPU kernel is float32)",
    },
    availability=lambda: _EXT.availability("linear_f32"),
    notes="float32 only: the weight-only GEMM's micro-kernels (AVX-512: 6 rows x 64 channels, "
    "AVX2: 6 x 16, fp32 FMA) on the weight prepacked once as their panels (cached per weight "
    "tensor), OpenMP over row blocks x 64-channel strips, bias and activation in the epilogue; "
    "plain loops on the scalar path",
)


# Measured with `mmkernels bench --family quant --only linear` (README): AMD EPYC Zen 5, 2 threads,
# our kernel against torch's float32 F.linear (MKL SGEMM at ~37-40% of the FMA peak there, likely
# its AVX2 code: half of Zen 5's 512-bit FMA width): 2.1-2.5x at M = 8-4096 (LLM decode batch,
# ViT / BERT / prefill shapes), 1.5-1.6x for M = 1 GEMVs. Not measured on other CPUs, Zen 4
# included (its AVX-512 is double-pumped 256-bit, so MKL's AVX2 code may run at its full FMA
# rate): calibration decides there where it is on, else torch keeps the call.
ZEN5_FAMILY = 26


def _measured_class() -> bool:
    if cpu_class() != "avx512" or cpu_vendor() != "amd" or cpu_family() < ZEN5_FAMILY:
        return False
    if not _EXT.availability("qmatmul_cpu_isa")[0]:
        return False
    return _EXT.require("qmatmul_cpu_isa").qmatmul_cpu_isa().startswith("avx512")  # MMKERNELS_CPU_ISA


# Below this many multiply-adds (M rounded up to a power of two) a call is mostly fixed costs, and
# torch's are lower: AMD Zen 5, through mmkernels.linear, torch vs ours 5.6 vs 8.7 us at 1x32x32,
# 8.5 vs 9.7 at 1x256x256, 9.6 vs 10.3 at 64x64x64; ours wins from 1x384x384 (13.2 vs 10.2).
TINY_MACS = 1 << 17


def _torch_auto_rule(call):
    """torch's F.linear unless our float32 kernel was measured (or calibrated) faster on this CPU"""
    reasons = CPU.reasons(call)
    if reasons:
        return True, f"our cpu kernel cannot take it ({'; '.join(reasons)})"
    if call.bucket is not None:
        decision = _calibration.decide(OP, _calibration_bucket(call), lambda: _calibration_contenders(call))
        if decision is not None:
            return decision.winner == "torch", decision.why
    if _measured_class():
        if call.bucket is not None and math.prod(call.bucket) < TINY_MACS:
            return True, (
                f"a call under {TINY_MACS} multiply-adds: the per-call costs decide, and torch's are lower "
                "(AMD Zen 5: 5.6-8.5 against 8.7-9.7 us through mmkernels.linear)"
            )
        return False, (
            "our float32 GEMM is faster on this AMD Zen 5 CPU (`mmkernels bench`: 2.1-2.5x "
            "torch's MKL SGEMM at M >= 8, 1.5-1.6x for GEMVs)"
        )
    return True, (
        f"torch's GEMM is the measured-safe choice on this {cpu_class()} CPU (ours was measured "
        "faster on AMD Zen 5 only; MMKERNELS_CALIBRATE=1 times both here)"
    )


# Calibration times both backends on a synthetic problem of the call's bucket
# (_calibration.gemm_problem: about CALIBRATION_MACS multiply-adds per thread, a few ms).
CALIBRATION_MACS = 1 << 25


def _calibration_bucket(call) -> str:
    m, k, n = call.bucket
    return f"{call.dtype_name}, M~{m}, K={k}, N={n}"


def _calibration_contenders(call):
    import torch

    from .api import linear

    m, k, n = _calibration.gemm_problem(*call.bucket, CALIBRATION_MACS)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)

    def contender(name):
        return lambda: linear(x, w, b, backend=name)

    return {"cpu": contender("cpu"), "torch": contender("torch")}


# In place on F.linear's fresh output where torch has an in-place form (no autograd here: the
# custom op's formula or plain eager without gradients).
_IN_PLACE = {"relu": F.relu_, "silu": lambda y: F.silu(y, inplace=True)}


def torch_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.linear``, then torch's activation (mmkernels._activations)."""
    y = F.linear(x, weight, bias)
    return y if activation is None else _IN_PLACE.get(activation, ACTIVATIONS[activation])(y)


def _torch_check(call) -> List[str]:
    return ["float64 is the reference's (the test oracle)"] if call.dtype_name == "float64" else []


TORCH = _dispatch.Backend(
    "torch",
    torch_linear,
    devices=None,
    check=_torch_check,
    auto_rule=_torch_auto_rule,
    notes="torch.nn.functional.linear (MKL / oneDNN on CPUs, cuBLAS on GPUs), then torch's activation",
)

REFERENCE = _dispatch.Backend(
    "reference",
    "mmkernels.linear.reference:linear_reference",
    devices=None,
    notes="plain PyTorch (the spec): torch.nn.functional.linear and torch's activation in the inputs' dtype",
)

for _backend in (TORCH, CPU, REFERENCE):
    _dispatch.register(OP, _backend)
