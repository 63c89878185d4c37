"""The attention backends, declared as data (mmkernels._dispatch.Backend): the reasons one cannot
serve a call and the rows of ``mmkernels info`` both derive from these declarations.

Priority for auto-selection (first capable wins): CUDA tensors -> cuda, triton, reference;
CPU tensors -> torch (PyTorch's SDPA, only where its auto rule takes the call: where calibration
timed it faster on this machine, else on AMX CPUs; and calls our cpu kernel cannot take), cpu,
reference. The Triton backend also runs CPU tensors under ``TRITON_INTERPRET=1``, but only when
asked for explicitly (that is how it is tested without a GPU).
"""

from __future__ import annotations

import importlib
from typing import List

from .. import _calibration, _dispatch
from .._extension import CPU as _EXT
from .._extension import cpu_class
from .api import OP, AttentionCall

MAX_HEAD_DIM = 256
HEAD_DIMS = _dispatch.HeadDims(8, MAX_HEAD_DIM, 8)

_dispatch.define_op(
    OP,
    features={
        "varlen": lambda c: c.varlen,
        "causal": lambda c: c.causal,
        "key_bias": lambda c: c.has_bias,
        "scores": lambda c: bool(c.scores),
        "lse": lambda c: c.return_lse,
        "gqa": lambda c: c.num_heads_q != c.num_heads_kv,
    },
)


# --- cuda -------------------------------------------------------------------------------------


def _cuda_availability():
    return False, "no CUDA C++ attention kernel yet (Triton serves CUDA tensors)"


def _cuda_run(*args):  # pragma: no cover - never selected while unavailable
    raise RuntimeError("the CUDA attention backend has no kernel yet")


CUDA = _dispatch.Backend(
    "cuda", _cuda_run, devices=("cuda",), availability=_cuda_availability, notes="build path + nvcc compile gate only"
)


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
    if (
        call.device_type == "cuda"
        and call.dtype_name == "float32"
        and max(call.head_dim, call.head_dim_v) > 128
        and not mod.interpreter_active()
    ):
        reasons.append("float32 with head dim > 128 on the GPU (the kernel would spill registers)")
    return reasons


TRITON = _dispatch.Backend(
    "triton",
    "mmkernels.attention.triton:attention_forward",
    devices=("cuda", "cpu"),
    auto_devices=("cuda",),
    dtypes=("float16", "bfloat16", "float32"),
    dtype_notes={"float64": "float64 is the reference's (the test oracle)"},
    head_dims=HEAD_DIMS,
    check=_triton_check,
    availability=_triton_availability,
    devices_note="cpu under TRITON_INTERPRET=1, when asked for",
    notes="FlashAttention-2 style forward + score pass reusing the LSE; f32 D > 128 not on the GPU",
)


# --- cpu (C++ extension) ------------------------------------------------------------------------

CPU = _dispatch.Backend(
    "cpu",
    "mmkernels.attention.cpu:attention_forward",
    devices=("cpu",),
    dtypes=("float32", "bfloat16", "float16"),
    dtype_notes={
        "float64": "float64 is the reference's (the test oracle; the kernel computes in float32)",
    },
    head_dims=HEAD_DIMS,
    availability=lambda: _EXT.availability("attention_fwd"),
    notes="OpenMP; AVX-512(+BF16) / AVX2 / scalar chosen at run time; float16 is widened to "
    "float32 with F16C and computed in float32, the output rounded to float16 (x86 has no fp16 "
    "dot product with float32 accumulation before AMX-FP16 / AVX10.2)",
)


# --- torch (PyTorch's CPU flash attention, the kernel of F.scaled_dot_product_attention) ----------


def _torch_availability():
    import torch

    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return True, ""
    return False, f"torch {torch.__version__} has no aten._scaled_dot_product_flash_attention_for_cpu"


def _torch_check(call: AttentionCall) -> List[str]:
    if call.head_dim != call.head_dim_v:
        return [f"D={call.head_dim} != Dv={call.head_dim_v} (SDPA's CPU flash kernel needs D == Dv)"]
    return []


# Measured with `mmkernels bench` (paired rounds, plain calls, ViT-B/16 .. SigLIP shapes):
# Intel AMX: ours 0.26-0.44x SDPA's speed in bf16, 0.80-1.03x in fp32 (0.87-0.90x with key_bias),
# measurements/intel-amx-2026-12-05.md; AMD Zen 4 (no AMX): ours 1.49x fp32, 2.74x bf16 (README).
# float16 (our kernel widens it to fp32): AMD Zen 5, 2 threads, `mmkernels bench` paired rounds,
# five runs on a busy shared machine (load 3.5-6.5 on 2 cores): ours 2.0-4.2x SDPA's float16
# speed on ViT-B/16 (B=8), 1.5-4.3x on DINOv2-S (B=8); best times 3.4 vs 13.9 ms, 2.5 vs 10.9 ms.
# Not measured on AMX: float16 calls there follow the AMX rule (SDPA), as fp32 / bf16 do.
def _torch_auto_rule(call: AttentionCall):
    """the faster of SDPA and our cpu kernel where calibrated (mmkernels._calibration), else SDPA on
    AMX CPUs only; SDPA always when our cpu kernel cannot take the call (it beats the reference)"""
    cpu_reasons = CPU.reasons(call)
    if cpu_reasons:
        return True, "our cpu kernel cannot take it; SDPA beats the reference"
    decision = _calibrated(call)
    if decision is not None:
        return decision.winner == "torch", decision.why
    klass = cpu_class()
    if klass == "amx":
        return True, (
            "AMX CPU: oneDNN's SDPA beats our AVX-512 kernel (Intel AMX: ours 0.26-0.44x "
            "its speed in bf16, 0.80-1.03x in fp32; float16, computed in fp32 by ours, unmeasured)"
        )
    return False, (
        f"{klass} CPU without AMX: our cpu kernel is faster (AMD Zen 4: 1.49x SDPA in fp32, 2.74x in "
        "bf16; AMD Zen 5: 1.5-4.3x SDPA in fp16)"
    )


# Calibration times both backends on a synthetic problem of the call's bucket. Its batch, then its
# query rows (independent; down to 16) shrink until one run is about CALIBRATION_MACS multiply-adds
# per thread (a few ms; more for long keys); heads, head dims, key length and features stay.
CALIBRATION_MACS = 1 << 25


def _calibration_bucket(call: AttentionCall) -> str:
    lq, lk, bh = call.bucket
    group = call.num_heads_q // max(call.num_heads_kv, 1)
    extras = [f"GQA {group}:1"] if group > 1 else []
    extras += [name for name, on in (("key_bias", call.has_bias), ("lse", call.return_lse)) if on]
    return ", ".join([f"{call.dtype_name}, D={call.head_dim}, Lq~{lq}, Lk~{lk}, B*H~{bh}", *extras])


def _calibration_sizes(call: AttentionCall):
    """(batch, Lq, Lk) of the synthetic problem for ``call``'s bucket."""
    lq, lk, bh = call.bucket
    hq, d = call.num_heads_q, call.head_dim
    batch = max(1, bh // hq)
    budget = CALIBRATION_MACS * _calibration.threads()
    while batch > 1 and batch * hq * lq * lk * 2 * d > budget:
        batch //= 2
    while lq > 16 and batch * hq * lq * lk * 2 * d > budget:
        lq //= 2
    return batch, lq, lk


def _calibration_contenders(call: AttentionCall):
    import torch

    from .api import attention

    batch, lq, lk = _calibration_sizes(call)
    hq, hkv, d = call.num_heads_q, call.num_heads_kv, call.head_dim
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, call.dtype_name)

    def make(heads, length):  # (B, L, H, D) storage viewed as (B, H, L, D), as projections give it
        return torch.randn(batch, length, heads, d, generator=g).to(dtype).transpose(1, 2)

    q, k, v = make(hq, lq), make(hkv, lk), make(hkv, lk)
    bias = torch.randn(batch, lk, generator=g) if call.has_bias else None

    def contender(name):
        return lambda: attention(q, k, v, key_bias=bias, return_lse=call.return_lse, backend=name)

    return {"cpu": contender("cpu"), "torch": contender("torch")}


def _calibrated(call: AttentionCall):
    """The calibrated decision for a call both backends serve, or None (calibration off, no sizes)."""
    if call.bucket is None:
        return None
    return _calibration.decide(OP, _calibration_bucket(call), lambda: _calibration_contenders(call))


TORCH = _dispatch.Backend(
    "torch",
    "mmkernels.attention.sdpa:attention_forward",
    devices=("cpu",),
    dtypes=("float32", "bfloat16", "float16"),
    dtype_notes={"float64": "float64 is the reference's (the test oracle)"},
    features=("key_bias", "lse", "gqa"),
    feature_notes={
        "causal": "causal: SDPA's is_causal is top-left aligned and reads masked keys "
        "(docs/nan_semantics.md says they are never read)",
        "scores": "scores: SDPA forms no per-key probabilities",
        "varlen": "varlen (cu_seqlens) is not served (SDPA is dense)",
    },
    check=_torch_check,
    availability=_torch_availability,
    auto_rule=_torch_auto_rule,
    notes="aten._scaled_dot_product_flash_attention_for_cpu (SDPA's CPU kernel, with its LSE); "
    "key_bias as a float32 mask; a NaN or +-inf in q / k / v is computed by the reference "
    "(exact NaN semantics)",
)


# --- reference ------------------------------------------------------------------------------

REFERENCE = _dispatch.Backend(
    "reference",
    "mmkernels.attention.reference:attention_forward",
    devices=None,
    notes="materialises (H, Lq, Lk) per sequence; the spec",
)

# Registration order is the auto-selection priority.
for _backend in (CUDA, TRITON, TORCH, CPU, REFERENCE):
    _dispatch.register(OP, _backend)
