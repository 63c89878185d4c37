"""The "cuda" backend of ``qmatmul``: glue to the int4 decode GEMV of csrc/cuda/qgemv_int4.cu.

``torch.ops.mmkernels_cuda.qgemv_int4`` exists when the CUDA extension ``mmkernels._cuda`` is built
(setup.py builds it only with a CUDA build of torch and a CUDA toolkit). It serves weight-only int4
(sym / asym, per channel or groups of 32 / 64 / 128) with float16 / bfloat16 activations, batch
M <= 8 per launch (the decode regime it is written for). Larger M is handed to the Triton GEMM
when Triton can run it, else processed in slices of 8 rows.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .._extension import CUDA as _EXT

MAX_BATCH = 8
DTYPES = ("float16", "bfloat16")

REQUIRED_OP = "qgemv_int4"


def _op():
    """``torch.ops.mmkernels_cuda.qgemv_int4`` or None (mmkernels._extension.CUDA says why)."""
    ops = _EXT.ops(REQUIRED_OP)
    return None if ops is None else getattr(ops, REQUIRED_OP)


def availability() -> Tuple[bool, str]:
    ok, why = _EXT.availability(REQUIRED_OP)
    if not ok:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def unsupported(call) -> List[str]:
    """Reasons this backend cannot serve ``call`` (a mmkernels.quant.api.QMatmulCall), derived from
    its declaration in mmkernels/quant/backends.py."""
    from .backends import CUDA

    return CUDA.unsupported(call)


def qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bits: int,
    bias: Optional[torch.Tensor] = None,
    act_bits: Optional[int] = None,
    smooth: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same signature and result as reference.qmatmul_tensors (weight-only int4 only)."""
    if bits != 4 or act_bits is not None or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("the cuda qmatmul backend runs weight-only int4 with float16 / bfloat16 x")
    op = _op()
    if op is None:
        _EXT.require(REQUIRED_OP)  # raises with the reason
    n = qweight.shape[0]
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_BATCH:
        try:
            from . import triton as triton_backend

            ok, _ = triton_backend.supports(x.dtype, x.device.type)
        except ImportError:
            ok = False
        if ok:
            return triton_backend.qmatmul(x, qweight, scales, zeros, bits, bias, act_bits, smooth)
    if smooth is not None:
        x2 = (x2.to(torch.float32) / smooth.to(torch.float32)).to(x.dtype)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    group_size = 0 if scales.shape[1] == 1 else k // scales.shape[1]
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    outs = (
        [op(x2[i : i + MAX_BATCH], qweight, scales, zeros, bias32, group_size) for i in range(0, max(m, 1), MAX_BATCH)]
        if m
        else [x2.new_empty(0, n)]
    )
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(*lead, n)
