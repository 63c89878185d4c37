"""The "torch" attention backend: PyTorch's CPU flash attention (the kernel behind
``F.scaled_dot_product_attention`` on CPU, called as ``aten._scaled_dot_product_flash_attention_for_cpu``
because it also returns the log-sum-exp).

It serves exactly what it can serve with this library's semantics (docs/nan_semantics.md,
docs/attention_kernel_contract.md), and its declaration in backends.py refuses the rest:

* no ``causal``: SDPA's ``is_causal`` is top-left aligned (ours bottom-right) and, like any additive
  mask, it reads masked keys (a NaN in a causally masked ``v`` or ``k`` reaches the rows that must
  not see it);
* no ``scores`` (SDPA never forms per-key probabilities), no varlen (``cu_seqlens``);
* ``D == Dv`` (the flash kernel's requirement);
* ``key_bias`` as a float32 mask ``(B, Hq, 1, Lk)``: exact for finite biases; ``-inf`` entries
  are added, not skipped, which is exact too once ``k`` and ``v`` are known finite (the rare path
  below); rows whose keys are all masked are set to the contract's ``out = 0``, ``lse = -inf``
  afterwards.

Rare path (the call is computed by the reference, exact): a NaN or ``±inf`` in ``q``, ``k`` or
``v`` (SDPA's kernel takes a row whose logits are all NaN or all ``-inf`` for a fully masked one:
out 0, lse 0, where the spec says NaN, resp. lse ``-inf``; an infinite ``v`` gives ``±inf`` where
the spec says NaN, and a ``-inf``-masked key's ``v`` would be read). Checking costs one pass
over the inputs, small beside the O(L^2 D) attention; with finite ``q``, ``k``, ``v`` and bias,
SDPA's output is finite (a convex combination of rows of ``v``) and needs no check. The check reads
each tensor once, in place (:func:`_all_finite`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._extension import CPU as _EXT
from . import reference

_NEG_INF = float("-inf")
_SCAN_OP = "attention_any_nonfinite"


def _all_finite(*tensors: torch.Tensor) -> bool:
    """False if a tensor holds a NaN or an inf. With the extension built: one pass over each
    tensor's elements in place (``mmkernels_C::attention_any_nonfinite``, an exponent-field test
    on the bits, vectorised on this CPU's ISA path, threads only for large tensors). Without it,
    one float32 sum per tensor added on the host (a NaN or inf makes it non-finite; a sum of
    finite values that overflows reads as non-finite too, which only sends the call to the exact
    rare path). The sums cost more: torch parallelises even small reductions (k of one decoding
    call, 6 heads x 100 keys x 64: 7 us on 2 threads, 2.4 us on one; AMD Zen 5), and
    ``isfinite(t).all()`` 10x more again."""
    ops = _EXT.ops(_SCAN_OP)
    if ops is not None:
        return not ops.attention_any_nonfinite.default(list(tensors))
    return math.isfinite(sum(t.sum(dtype=torch.float32).item() for t in tensors))


def _heads(t: torch.Tensor, hq: int) -> torch.Tensor:
    """k / v with their kv heads repeated to the query heads (query head h reads kv head h // g)."""
    hkv = t.shape[1]
    if hkv == hq:
        return t
    g = hq // hkv
    return t[:, :, None].expand(t.shape[0], hkv, g, *t.shape[2:]).reshape(t.shape[0], hq, *t.shape[2:])


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
) -> Optional[torch.Tensor]:
    """Writes lse3 (when given) as the contract specifies, for the calls the backend declares
    (dense, not causal, no scores, D == Dv), and returns SDPA's output when it is laid out as
    out4 is (the contract allows it: SDPA has no ``out=``), else writes it into out4."""
    if causal or cu_seqlens_q is not None or scores_mode or q4.shape[-1] != v4.shape[-1]:
        raise ValueError(
            "the torch attention backend serves dense, non-causal calls without "
            "scores and with D == Dv (dispatch checks this)"
        )
    if not _all_finite(q4, k4, v4):
        reference.attention_forward(
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
        )
        return
    hq = q4.shape[1]
    mask = masked = None
    if bias3 is not None:
        is_masked = bias3 == _NEG_INF
        if bool(is_masked.any()):
            masked = is_masked.all(-1)  # (B, Hq): rows that see no key
        # float32 mask even for half q: the bias is added in float32, as the spec does
        mask = bias3.to(torch.float32)[:, :, None, :]
    if lse3 is None and k4.shape[1] != hq:
        # GQA without lse: SDPA reads the shared kv heads itself (the aten op below needs them
        # repeated, a copy of K and V: decoding SmolLM2's 9:3 heads over 2048 keys, 97 vs 218 us).
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=float(scale), enable_gqa=True)
        lse = None
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q4, _heads(k4, hq), _heads(v4, hq), 0.0, False, attn_mask=mask, scale=float(scale)
        )
    if masked is not None:
        out = out.masked_fill(masked[:, :, None, None], 0.0)
        if lse is not None:
            lse = lse.masked_fill(masked[:, :, None], _NEG_INF)
    if lse3 is not None:
        lse3.copy_(lse)
    if out.dtype == out4.dtype and out.stride() == out4.stride():
        return out
    out4.copy_(out)
    return None
