"""Glue from the attention contract (docs/attention_kernel_contract.md) to the C++ CPU kernel.

The kernel lives in the extension ``mmkernels._C`` (csrc/cpu/attention*.cpp, registered as
``torch.ops.mmkernels_C.attention_fwd``). It needs stride(-1) == 1 for q4/k4/v4/out4 (and the bias);
everything else about the layout (batch, head and sequence strides) is used as given, so the usual
``(B, L, H, D).transpose(1, 2)`` views cost no copy.

The code path (AMX tiles for bfloat16, AVX-512 with BF16 dot products, AVX-512, AVX2, scalar) is
chosen from CPUID on every call; ``MMKERNELS_CPU_ISA=amx|avx512_bf16|avx512|avx2|scalar`` forces a
lower one, and ``MMKERNELS_CPU_ISA=amx_emulated`` (tests) runs the AMX kernel over emulated tiles.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._extension import CPU as _EXT

REQUIRED_OP = "attention_fwd"


# is_available(), LOAD_ERROR (module attribute) and cpu_isa(), as for every family's glue.
is_available, __getattr__, cpu_isa = _EXT.family_accessors(__name__, REQUIRED_OP, "cpu_isa")


def cpu_isa_or_reason() -> str:
    """:func:`cpu_isa`, or why there is none (for ``mmkernels info`` and the bench's machine line)."""
    return cpu_isa() if is_available() else "n/a (extension not built)"


def _last_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or t.size(-1) <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def attention_forward(
    q4,
    k4,
    v4,
    bias3,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    scores_mode,
    out4,
    lse3,
    scores2,
) -> None:
    """Writes out4 (and lse3 / scores2 when given) as the contract specifies."""
    kernel = _EXT.kernel(REQUIRED_OP)
    if q4.stride(-1) != 1 or k4.stride(-1) != 1 or v4.stride(-1) != 1 or (bias3 is not None and bias3.stride(-1) != 1):
        q4, k4, v4, bias3 = (_last_contiguous(t) for t in (q4, k4, v4, bias3))
    if cu_seqlens_q is not None and (cu_seqlens_q.dtype != torch.int32 or not cu_seqlens_q.is_contiguous()):
        cu_seqlens_q = cu_seqlens_q.to(torch.int32).contiguous()
    if cu_seqlens_k is not None and (cu_seqlens_k.dtype != torch.int32 or not cu_seqlens_k.is_contiguous()):
        cu_seqlens_k = cu_seqlens_k.to(torch.int32).contiguous()
    target = out4
    if out4.stride(-1) != 1 and out4.size(-1) > 1:
        target = torch.empty(out4.shape, dtype=out4.dtype, device=out4.device)
    kernel(
        q4,
        k4,
        v4,
        bias3,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        bool(causal),
        float(scale),
        int(scores_mode),
        target,
        lse3,
        scores2,
    )
    if target is not out4:
        out4.copy_(target)
