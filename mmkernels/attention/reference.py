"""The specification of ``mmkernels.attention``, in plain PyTorch.

For one sequence and one head, with logits ``s = scale * q @ k.T + bias``:

* causal masking is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Lk - Lq``
  (FlashAttention >= 2.1 semantics), a masked logit is ``-inf``;
* key ``j`` is *masked* for row ``i`` when causality excludes it or ``bias[j] = -inf``; a masked key
  is never read: its ``k``, ``v`` and bias values (NaN included) do not reach row ``i``;
* ``p = softmax(s)`` row by row; a row whose keys are all masked has ``p = 0``, so its output
  is 0 and its log-sum-exp is ``-inf`` (never NaN);
* a row that sees a NaN logit or a ``+inf`` one (NaN in q, k or the bias of a key it sees,
  ``bias = +inf``, ...) is a *NaN row*: ``p`` is NaN on the keys it sees (0 on masked keys), its
  output and its lse are NaN (what softmax gives; ``logsumexp`` alone would say ``+inf``);
* ``out = p @ v`` over the keys the row sees; a NaN or ``±inf`` in ``v[j, c]`` makes ``out[i, c]``
  NaN for every row ``i`` that sees key ``j`` (±inf too: the value is not a usable weight);
  ``lse = logsumexp(s)``;
* per-key scores average ``p`` over the query heads and over the rows that count:
  row 0 (``"cls"``), the last row (``"last"``) or every row (``"mean"``); a NaN row among them
  makes the scores of the keys it sees NaN.

docs/nan_semantics.md states the same rules for every op of the library.

This module materialises the ``(H, Lq, Lk)`` matrix on purpose: it is the readable spec and the
float64 oracle of the tests, not a fast path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SCORES_MODES = {None: 0, "cls": 1, "last": 2, "mean": 3}


def sequence_attention(q, k, v, bias=None, *, causal=False, scale=None):
    """Attention of one sequence.

    q ``(Hq, Lq, D)``, k ``(Hkv, Lk, D)``, v ``(Hkv, Lk, Dv)``, bias broadcastable to ``(Hq, Lk)``.
    Returns ``out (Hq, Lq, Dv)``, ``lse (Hq, Lq)`` and the probabilities ``p (Hq, Lq, Lk)``.
    """
    hq, lq, d = q.shape
    hkv, lk, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = hq // hkv
    k = k.repeat_interleave(group, dim=0)  # GQA: query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=0)
    logits = scale * (q @ k.transpose(-1, -2))
    # visible[i, j] (broadcast to (Hq, Lq, Lk)): row i reads key j. Masked keys are never read.
    visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        visible = j <= i + (lk - lq)
    if bias is not None:
        b = bias.to(logits.dtype)[..., None, :]
        visible = visible & (b != float("-inf"))
        logits = logits + b
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    lse = torch.where(lse == float("inf"), float("nan"), lse)  # a +inf logit: NaN row
    empty = (lse == float("-inf"))[..., None]  # fully masked row: p = 0
    p = torch.exp(logits - torch.where(empty, 0, lse[..., None]))
    p = torch.where(visible, p, 0)  # NaN rows: NaN on visible keys only
    bad_v = ~torch.isfinite(v)
    out = p.to(v.dtype) @ v.masked_fill(bad_v, 0)
    # NaN / inf in v[j, c]: NaN in column c of every row that sees key j
    hit = visible.to(v.dtype) @ bad_v.to(v.dtype)
    out = torch.where(hit > 0, float("nan"), out)
    return out, lse, p


def sequence_scores(p, mode: int):
    """Per-key scores ``(Lk,)`` from probabilities ``p (Hq, Lq, Lk)``; see the module docstring."""
    lq, lk = p.shape[1], p.shape[2]
    if lq == 0:
        return p.new_zeros(lk)
    rows = {1: p[:, :1], 2: p[:, -1:], 3: p}[mode]
    return rows.mean(dim=(0, 1))


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
    compute_dtype: Optional[torch.dtype] = None,
):
    """Backend entry point on the canonical views (docs/attention_kernel_contract.md).

    Computes in ``compute_dtype``: float32 for half-precision inputs unless told otherwise, the
    input dtype for float32/float64 (the tests pass float64 inputs to get the oracle).
    """
    if compute_dtype is None:
        compute_dtype = torch.float32 if q4.dtype in (torch.float16, torch.bfloat16) else q4.dtype
    if cu_seqlens_q is None:
        n_seq = q4.shape[0]
        spans_q = [(b, 0, q4.shape[2]) for b in range(n_seq)]
        spans_k = [(b, 0, k4.shape[2]) for b in range(n_seq)]
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        spans_q = [(0, cq[b], cq[b + 1]) for b in range(len(cq) - 1)]
        spans_k = [(0, ck[b], ck[b + 1]) for b in range(len(ck) - 1)]
    for (bq, q0, q1), (bk, k0, k1) in zip(spans_q, spans_k):
        q = q4[bq, :, q0:q1].to(compute_dtype)
        k = k4[bk, :, k0:k1].to(compute_dtype)
        v = v4[bk, :, k0:k1].to(compute_dtype)
        bias = None if bias3 is None else bias3[bk, :, k0:k1]
        out, lse, p = sequence_attention(q, k, v, bias, causal=causal, scale=scale)
        out4[bq, :, q0:q1] = out.to(out4.dtype)
        if lse3 is not None:
            lse3[bq, :, q0:q1] = lse.to(lse3.dtype)
        if scores2 is not None and scores_mode:
            scores2[bk, k0:k1] = sequence_scores(p, scores_mode).to(scores2.dtype)
