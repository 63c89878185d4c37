"""Triton backend of ``mmkernels.attention``: a FlashAttention-2 style forward and a token-scores kernel.

``attention_forward`` implements docs/attention_kernel_contract.md exactly: it receives canonical strided
views (q4, k4, v4, bias3, ...) and writes ``out4`` / ``lse3`` / ``scores2`` in place.

Kernels
-------
* ``_attn_fwd_kernel``: one program per (query block, query head, sequence). Online softmax in the base-2
  domain (logits pre-multiplied by ``scale * log2(e)``, ``exp2``), fp32 running max / sum / accumulator; P is
  rounded to the input dtype before the P.V dot on the GPU, as FlashAttention does. The key loop is split
  in two: tiles that need no mask at all (fully inside the sequence and, when causal, fully visible to every
  row of the block) and the remaining tiles (the causal diagonal and the ragged last tile), which are masked.
  Causal tiles above the diagonal are never visited.
  NaN / inf (docs/nan_semantics.md): a key whose bias is -inf is never read (its V load is masked
  off, its logit forced to -inf); a NaN or +inf logit makes the row's l NaN, hence a NaN row (out
  and lse). V values of visible keys are used as loaded (NaN propagates through P.V; an inf that
  comes out is turned into NaN at the end); in causal diagonal tiles, where a key is masked for
  some rows only, non-finite V values are zeroed and the rows that see them get NaN in that column.
* ``_attn_scores_kernel``: per-key importance (``scores_mode`` cls / last / mean). One program per
  (key block, sequence) loops over the query heads and over the query rows that count, recomputes that
  tile's logits and ``p = exp(s - lse)`` from the forward's row LSE, and sums columns. Each program owns its
  key block, so the result is deterministic without atomics.

Head dims
---------
Any D / Dv that is a multiple of 8 in [8, 256]. The register tile is ``BLOCK_D = next_power_of_2(D)``
(at least 16, the smallest ``tl.dot`` K) with masked loads. Padding waste: the dot work and the Q / K / V /
accumulator registers scale with BLOCK_D, not D; e.g. D=72 runs as 128 (44 % of the QK^T and P.V MACs are
padding), D=96 as 128 (25 %), D=40 as 64 (37.5 %), D=8 as 16 (50 %). Power-of-two head dims have none.

Configs
-------
``select_config`` picks (BLOCK_M, BLOCK_N, num_warps, num_stages) from the head-dim bucket, dtype and GPU
generation (one explicit config, no ``@triton.autotune``); ``compile_targets`` lists every kernel variant
dispatch can choose, for the AOT compile gate (``python -m mmkernels.compile_gate``).

Interpreter
-----------
With ``TRITON_INTERPRET=1`` or CPU tensors the kernels run in Triton's interpreter, where bf16/fp16
``tl.dot`` is unreliable: the ``UPCAST`` constexpr then converts dot operands to fp32 (P stays fp32).
Whether ``@triton.jit`` functions (Triton's own ``tl.zeros`` & co. included) are compiled or interpreted
is fixed when triton is first imported: CPU tensors therefore need ``TRITON_INTERPRET=1`` set before that
(tests/conftest.py does), and the compile gate compiles in fresh worker processes without it.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple

import torch

from .._triton_support import (
    CompileTarget,
    interpreter_active,
    is_available,  # noqa: F401
    tl,
    triton,
)

LOG2E = 1.4426950408889634
SCORES_NONE, SCORES_CLS, SCORES_LAST, SCORES_MEAN = 0, 1, 2, 3
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256
# After rounding D (and Dv) up to a power of two; 16 is the smallest K dimension tl.dot accepts.
BLOCK_DS = (16, 32, 64, 128, 256)


# ----------------------------------------------------------------------------------------------
# Head-dim tiling
# ----------------------------------------------------------------------------------------------
def block_d(head_dim: int) -> int:
    """Register tile width for a head dim: next power of two, at least 16."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Kernels (defined only when triton imports)
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _fwd_tile(
        acc,
        m_i,
        l_i,
        q,
        K_head,
        V_head,
        Bias_head,
        start_n,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_bn,
        len_k,
        causal_shift,
        head_dim,
        head_dim_v,
        qk_scale,
        use_bias,
        MASKED: tl.constexpr,
        IS_CAUSAL: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """One key tile of the online softmax. MASKED=False: every key valid for every row."""
        keys = start_n + offs_n
        d_ok = offs_d < head_dim
        dv_ok = offs_dv < head_dim_v
        k_ptrs = (
            K_head + tl.cast(start_n, tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        )  # (BLOCK_D, BLOCK_N) = K^T
        v_ptrs = (
            V_head + tl.cast(start_n, tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        )  # (BLOCK_N, BLOCK_DV)
        # Key bias, branch-free: without a bias the load is masked off and adds 0 (one FADD per
        # logit; it saves a kernel variant per config). A key whose bias is -inf is never read:
        # its V load is masked off (so P = 0 cannot meet a NaN there) and its logit is -inf.
        b_ptrs = Bias_head + keys.to(tl.int64) * stride_bn
        if MASKED:
            key_ok = keys < len_k
            bias = tl.load(b_ptrs, mask=key_ok & use_bias, other=0.0)
            live = key_ok & (bias != float("-inf"))
            kt = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=live[:, None] & dv_ok[None, :], other=0.0)
        else:
            bias = tl.load(b_ptrs, mask=use_bias, other=0.0)
            live = bias != float("-inf")
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=live[:, None] & dv_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        # logits in the log2 domain: s = (scale * q.k + bias) * log2(e)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        s = s + bias[None, :] * 1.4426950408889634
        if MASKED:
            valid = live[None, :]
            if IS_CAUSAL:  # bottom-right aligned: row i sees keys j <= i + (Lk - Lq)
                valid = valid & (keys[None, :] <= offs_m[:, None] + causal_shift)
                # A key masked for some rows only: a NaN / inf in its V must not reach them
                # through P = 0. Zero those values; the rows that see the key (j <= i + shift)
                # get NaN in that column: first_bad[c] = the first such key of the tile.
                v_bad = (v - v) != 0.0
                first_bad = tl.min(tl.where(v_bad, keys[:, None], 2147483647), 0)
                v = tl.where(v_bad, 0.0, v)
            s = tl.where(valid, s, float("-inf"))
        elif use_bias:
            s = tl.where(live[None, :], s, float("-inf"))  # NaN q.k of a masked key stays out
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no finite logit so far keeps m = -inf; subtracting 0 instead of -inf keeps
        # exp2(-inf - (-inf)) = NaN out of alpha and p (both become exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if UPCAST:
            acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if MASKED:
            if IS_CAUSAL:
                acc = tl.where(first_bad[None, :] <= offs_m[:, None] + causal_shift, float("nan"), acc)
        return acc, m_new, l_i

    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        Bias,
        Out,
        Lse,
        CuQ,
        CuK,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_bb,
        stride_bh,
        stride_bn,
        stride_ob,
        stride_oh,
        stride_om,
        stride_od,
        stride_lb,
        stride_lh,
        stride_lm,
        seqlen_q,
        seqlen_k,
        head_dim8,
        head_dim_v8,
        kv_group,
        qk_scale,
        is_varlen,
        write_lse,
        has_bias,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        IS_CAUSAL: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # D and Dv arrive divided by 8 (the contract makes them multiples of 8) so that the compiler
        # knows the head-dim masks are constant over 8 lanes and keeps 16-byte vector loads.
        head_dim = head_dim8 * 8
        head_dim_v = head_dim_v8 * 8
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        # Sequence extent. Dense: tensor batch b, rows [0, seqlen). Varlen: tensor batch 0,
        # rows [cu[b], cu[b+1]). Branch-free: the cu_seqlens loads are masked off when dense.
        varlen = is_varlen != 0
        q_start = tl.load(CuQ + b, mask=varlen, other=0)
        len_q = tl.load(CuQ + b + 1, mask=varlen, other=seqlen_q) - q_start
        k_start = tl.load(CuK + b, mask=varlen, other=0)
        len_k = tl.load(CuK + b + 1, mask=varlen, other=seqlen_k) - k_start
        start_m = pid_m * BLOCK_M
        # Exit when the grid (it covers max_seqlen_q) is past this sequence's end, and for a
        # sequence whose rows do not lie inside the tensors: GPU cu_seqlens are not validated
        # (that needs a host sync), so a malformed one leaves rows unwritten but is never read or
        # written out of bounds. (A branch, not a clamp of the extents: clamping made ptxas spill
        # in several compile-gate configs.)
        if (
            (start_m >= len_q)
            | (q_start < 0)
            | (q_start + len_q > seqlen_q)
            | (k_start < 0)
            | (len_k < 0)
            | (k_start + len_k > seqlen_k)
        ):
            return
        batch = tl.where(varlen, 0, b).to(tl.int64)
        kv_h = tl.cast(h // kv_group, tl.int64)
        h64 = tl.cast(h, tl.int64)
        use_bias = has_bias != 0

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < len_q

        q_ptrs = (
            Q
            + batch * stride_qb
            + h64 * stride_qh
            + tl.cast(q_start + start_m, tl.int64) * stride_qm
            + tl.arange(0, BLOCK_M)[:, None] * stride_qm
            + offs_d[None, :] * stride_qd
        )
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        K_head = K + batch * stride_kb + kv_h * stride_kh + k_start.to(tl.int64) * stride_kn
        V_head = V + batch * stride_vb + kv_h * stride_vh + k_start.to(tl.int64) * stride_vn
        Bias_head = Bias + batch * stride_bb + h64 * stride_bh + k_start.to(tl.int64) * stride_bn

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

        causal_shift = len_k - len_q
        if IS_CAUSAL:
            # keys visible to some row of the block: j < start_m + BLOCK_M + shift
            hi = tl.maximum(tl.minimum(len_k, start_m + BLOCK_M + causal_shift), 0)
            # keys visible to every row of the block: j <= start_m + shift
            full_hi = tl.maximum(tl.minimum(len_k, start_m + causal_shift + 1), 0)
        else:
            hi = len_k
            full_hi = len_k
        full_hi = (full_hi // BLOCK_N) * BLOCK_N

        # 1) unmasked tiles
        for start_n in range(0, full_hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                K_head,
                V_head,
                Bias_head,
                start_n,
                offs_m,
                offs_n,
                offs_d,
                offs_dv,
                stride_kn,
                stride_kd,
                stride_vn,
                stride_vd,
                stride_bn,
                len_k,
                causal_shift,
                head_dim,
                head_dim_v,
                qk_scale,
                use_bias,
                False,
                IS_CAUSAL,
                UPCAST,
                DOT_PRECISION,
            )
        # 2) the causal diagonal and the ragged last tile
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                K_head,
                V_head,
                Bias_head,
                start_n,
                offs_m,
                offs_n,
                offs_d,
                offs_dv,
                stride_kn,
                stride_kd,
                stride_vn,
                stride_vd,
                stride_bn,
                len_k,
                causal_shift,
                head_dim,
                head_dim_v,
                qk_scale,
                use_bias,
                True,
                IS_CAUSAL,
                UPCAST,
                DOT_PRECISION,
            )

        # Fully masked rows (l = 0): out 0, lse -inf. NaN rows (l NaN): out and lse NaN.
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        # |out| <= max |V| for finite V: an inf here came from an inf in V, which gives NaN.
        acc = tl.where(tl.abs(acc) == float("inf"), float("nan"), acc)
        o_ptrs = (
            Out
            + batch * stride_ob
            + h64 * stride_oh
            + tl.cast(q_start + start_m, tl.int64) * stride_om
            + tl.arange(0, BLOCK_M)[:, None] * stride_om
            + offs_dv[None, :] * stride_od
        )
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        l_ptrs = Lse + batch * stride_lb + h64 * stride_lh + (q_start + offs_m).to(tl.int64) * stride_lm
        tl.store(l_ptrs, lse, mask=row_ok & (write_lse != 0))

    @triton.jit
    def _attn_scores_kernel(
        Q,
        K,
        Bias,
        Lse,
        Scores,
        CuQ,
        CuK,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_bb,
        stride_bh,
        stride_bn,
        stride_lb,
        stride_lh,
        stride_lm,
        stride_sb,
        stride_sn,
        seqlen_q,
        seqlen_k,
        num_heads,
        head_dim8,
        kv_group,
        qk_scale,
        is_varlen,
        mode,
        has_bias,
        is_causal,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        head_dim = head_dim8 * 8  # see _attn_fwd_kernel
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        varlen = is_varlen != 0
        # Clamped to the tensors' rows (GPU cu_seqlens are not validated, see _attn_fwd_kernel):
        # a negative len_k exits below, a negative len_q leaves an empty row range, so every
        # access stays inside the tensors. (A clamp here, not the forward's branch: the branch made
        # ptxas spill in two compile-gate configs of this kernel.)
        q_start = tl.maximum(tl.load(CuQ + b, mask=varlen, other=0), 0)
        len_q = tl.minimum(tl.load(CuQ + b + 1, mask=varlen, other=seqlen_q), seqlen_q) - q_start
        k_start = tl.maximum(tl.load(CuK + b, mask=varlen, other=0), 0)
        len_k = tl.minimum(tl.load(CuK + b + 1, mask=varlen, other=seqlen_k), seqlen_k) - k_start
        start_n = pid_n * BLOCK_N
        if start_n >= len_k:
            return
        batch = tl.where(varlen, 0, b).to(tl.int64)
        causal_shift = len_k - len_q

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        key_ok = offs_n < len_k
        d_ok = offs_d < head_dim
        # Rows that count: cls -> [0, 1), last -> [Lq-1, Lq), mean -> [0, Lq)  (empty when Lq == 0)
        row_lo = tl.where(mode == 2, tl.maximum(len_q - 1, 0), 0)
        row_hi = tl.where(mode == 1, tl.minimum(len_q, 1), len_q)
        n_rows = row_hi - row_lo
        # Causal (a runtime flag here: it only moves the row range and adds one compare per logit):
        # rows i < start_n - shift see none of this block's keys.
        causal = is_causal != 0
        row_start = tl.where(causal, tl.maximum(row_lo, start_n - causal_shift), row_lo)

        col = tl.zeros([BLOCK_N], dtype=tl.float32)
        for h in range(0, num_heads):
            h64 = tl.cast(h, tl.int64)
            kv_h = tl.cast(h // kv_group, tl.int64)
            k_ptrs = (
                K
                + batch * stride_kb
                + kv_h * stride_kh
                + (k_start + offs_n).to(tl.int64)[None, :] * stride_kn
                + offs_d[:, None] * stride_kd
            )
            kt = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            bias = tl.load(
                Bias + batch * stride_bb + h64 * stride_bh + (k_start + offs_n).to(tl.int64) * stride_bn,
                mask=key_ok & (has_bias != 0),
                other=0.0,
            )
            Q_head = Q + batch * stride_qb + h64 * stride_qh
            L_head = Lse + batch * stride_lb + h64 * stride_lh
            for start_m in range(row_start, row_hi, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                r_ok = rows < row_hi
                q_ptrs = (
                    Q_head
                    + tl.cast(q_start + start_m, tl.int64) * stride_qm
                    + tl.arange(0, BLOCK_M)[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd
                )
                q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                lse = (
                    tl.load(L_head + (q_start + rows).to(tl.int64) * stride_lm, mask=r_ok, other=float("-inf"))
                    * 1.4426950408889634
                )
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale + bias[None, :] * 1.4426950408889634
                # A NaN row (lse NaN) counts: p is NaN on the keys it sees. Keys with bias -inf
                # are never read (p = 0 whatever q.k is).
                valid = r_ok[:, None] & key_ok[None, :] & (lse[:, None] != float("-inf"))
                valid = valid & (bias[None, :] != float("-inf"))
                valid = valid & ((offs_n[None, :] <= rows[:, None] + causal_shift) | (is_causal == 0))
                lse_safe = tl.where(lse != float("-inf"), lse, 0.0)  # fully masked rows: p = 0 below
                p = tl.where(valid, tl.exp2(s - lse_safe[:, None]), 0.0)
                col += tl.sum(p, 0)
        col = col / (num_heads * tl.maximum(n_rows, 1)).to(tl.float32)
        tl.store(Scores + batch * stride_sb + (k_start + offs_n).to(tl.int64) * stride_sn, col, mask=key_ok)


# ----------------------------------------------------------------------------------------------
# Compiled vs interpreted kernels
# ----------------------------------------------------------------------------------------------
def _module_is_interpreted(mod) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(mod._attn_fwd_kernel, InterpretedFunction)


def _kernels(interpret: bool):
    """This module, after checking its kernels were decorated in the requested mode.

    Triton fixes compiled-vs-interpreted when ``triton.language`` and the ``@triton.jit`` functions are
    created (its own helpers such as ``tl.zeros`` are jit functions too), so the mode cannot be switched
    later in the same process: CPU tensors need ``TRITON_INTERPRET=1`` before triton is first imported,
    and AOT compiles need a process without it (the compile gate uses fresh worker processes).
    """
    this = sys.modules[__name__]
    if _module_is_interpreted(this) != interpret:
        if interpret:
            raise RuntimeError(
                "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (tests/conftest.py does)."
            )
        raise RuntimeError(
            "Triton kernels were imported with TRITON_INTERPRET=1 and cannot be compiled in "
            "this process; run the compile in a process without it."
        )
    return this


# ----------------------------------------------------------------------------------------------
# Config selection
# ----------------------------------------------------------------------------------------------
def _cc_int(capability) -> Optional[int]:
    if capability is None:
        return None
    if isinstance(capability, (tuple, list)):
        return int(capability[0]) * 10 + int(capability[1])
    return int(capability)


def select_config(head_dim: int, dtype: torch.dtype, capability, causal: bool) -> Dict[str, int]:
    """Forward-kernel launch config for a head-dim bucket, dtype and GPU generation.

    ``head_dim`` is max(D, Dv); ``capability`` is (major, minor), an int like 80 / 90, or None for the
    interpreter. One explicit config per bucket (no autotuning); every value here is compiled and
    checked for spills / tensor-core use by the compile gate. ``causal`` picks smaller tiles in
    the few buckets where the causal variant would spill (``_CAUSAL_CONFIG``).
    Returns dict(BLOCK_M, BLOCK_N, num_warps, num_stages, SCORES_BLOCK_M, SCORES_WARPS) (the scores
    kernel uses BLOCK_N too, and always num_stages=1).
    """
    cfg = _base_config(block_d(head_dim), dtype, _cc_int(capability))
    if causal:
        # The causal diagonal tiles also sanitise non-finite V (docs/nan_semantics.md), which
        # costs registers: these buckets spilled with the non-causal config (compile gate).
        cfg.update(_CAUSAL_CONFIG.get((block_d(head_dim), dtype, _cc_int(capability)), {}))
    return cfg


# (BLOCK_D bucket, dtype, cc) -> causal overrides of the forward config (no spills, compile gate)
_CAUSAL_CONFIG = {
    (128, torch.float16, 80): dict(BLOCK_M=64, num_warps=4),
    (128, torch.bfloat16, 80): dict(BLOCK_M=64, num_warps=4),
    (64, torch.float16, 90): dict(num_warps=8),
    (64, torch.bfloat16, 90): dict(num_warps=8),
    (16, torch.float32, 80): dict(num_stages=1),
}


def _base_config(bd: int, dtype: torch.dtype, cc: Optional[int]) -> Dict[str, int]:
    if cc is None:  # interpreter: small tiles keep the multi-tile / diagonal paths exercised
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, SCORES_BLOCK_M=32, SCORES_WARPS=4)
    hopper = cc >= 90
    if dtype == torch.float32:
        # fp32 dots run as 3xTF32 (see dot_precision): the hi/lo operand split keeps about three
        # times the operand registers of fp16, so tiles are small. fp32 with D > 128 is not offered
        # on the GPU (every tile that fits without spilling is too small to be worth it).
        if bd <= 32:
            return dict(
                BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, SCORES_BLOCK_M=32, SCORES_WARPS=8 if cc < 90 else 4
            )
        if bd <= 64:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, SCORES_BLOCK_M=32, SCORES_WARPS=4)
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, SCORES_BLOCK_M=16, SCORES_WARPS=8)
    # fp16 / bf16: tensor-core dots (HMMA on sm_80, wgmma/HGMMA on sm_90)
    if bd <= 64:
        if hopper:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, SCORES_BLOCK_M=64, SCORES_WARPS=4)
        if bd <= 32:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, SCORES_BLOCK_M=64, SCORES_WARPS=8)
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3, SCORES_BLOCK_M=64, SCORES_WARPS=8)
    if bd <= 128:
        return dict(
            BLOCK_M=128,
            BLOCK_N=64 if hopper else 32,
            num_warps=8,
            num_stages=3 if hopper else 2,
            SCORES_BLOCK_M=64,
            SCORES_WARPS=8,
        )
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2 if hopper else 1, SCORES_BLOCK_M=32, SCORES_WARPS=8)


def supports(dtype: torch.dtype, head_dim: int, head_dim_v: int, device_type: str) -> Tuple[bool, str]:
    """Whether this backend takes a call with these properties; (False, reason) otherwise."""
    ok, why = is_available()
    if not ok:
        return False, why
    if dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {dtype} not in {SUPPORTED_DTYPES}"
    for name, d in (("D", head_dim), ("Dv", head_dim_v)):
        if d % 8 or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            return False, f"{name}={d} must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if device_type == "cpu" and not _module_is_interpreted(sys.modules[__name__]):
        return False, "CPU tensors need TRITON_INTERPRET=1 set before triton is first imported"
    if (
        device_type == "cuda"
        and dtype == torch.float32
        and max(head_dim, head_dim_v) > 128
        and not interpreter_active()
    ):
        return False, "float32 with head dim > 128 on the GPU (the kernel would spill registers)"
    return True, ""


def dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """``input_precision`` of every tl.dot.

    fp16/bf16: the operands are 16-bit, the value only matters for fp32 operands ("ieee" given).
    fp32 on the GPU: "tf32x3" (split-TF32, three tensor-core MMAs per product: about fp32 accuracy,
    the same error order as an fp32 FMA dot over D terms). Plain "ieee" fp32 dots run on CUDA cores
    with every thread holding whole K-rows of both operands, which spills at D >= 128 on sm_90.
    Interpreter: "ieee" (numpy fp32).
    """
    if interpret or dtype != torch.float32:
        return "ieee"
    return "tf32x3"


# ----------------------------------------------------------------------------------------------
# AOT compile targets (for mmkernels.compile_gate)
# ----------------------------------------------------------------------------------------------
_TL_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

FWD_ARGS = [
    "Q",
    "K",
    "V",
    "Bias",
    "Out",
    "Lse",
    "CuQ",
    "CuK",
    "stride_qb",
    "stride_qh",
    "stride_qm",
    "stride_qd",
    "stride_kb",
    "stride_kh",
    "stride_kn",
    "stride_kd",
    "stride_vb",
    "stride_vh",
    "stride_vn",
    "stride_vd",
    "stride_bb",
    "stride_bh",
    "stride_bn",
    "stride_ob",
    "stride_oh",
    "stride_om",
    "stride_od",
    "stride_lb",
    "stride_lh",
    "stride_lm",
    "seqlen_q",
    "seqlen_k",
    "head_dim8",
    "head_dim_v8",
    "kv_group",
    "qk_scale",
    "is_varlen",
    "write_lse",
    "has_bias",
]
SCORES_ARGS = [
    "Q",
    "K",
    "Bias",
    "Lse",
    "Scores",
    "CuQ",
    "CuK",
    "stride_qb",
    "stride_qh",
    "stride_qm",
    "stride_qd",
    "stride_kb",
    "stride_kh",
    "stride_kn",
    "stride_kd",
    "stride_bb",
    "stride_bh",
    "stride_bn",
    "stride_lb",
    "stride_lh",
    "stride_lm",
    "stride_sb",
    "stride_sn",
    "seqlen_q",
    "seqlen_k",
    "num_heads",
    "head_dim8",
    "kv_group",
    "qk_scale",
    "is_varlen",
    "mode",
    "has_bias",
    "is_causal",
]


def compiled_kernel(name: str):
    """The compiled (not interpreted) kernel ``name``, for the compile gate."""
    return getattr(_kernels(False), name)


def _target(kernel, arg_names, variant, dtype, ptr_types, constexprs, cfg, cc, aligned):
    sig = {}
    for name in arg_names:
        if name in ptr_types:
            sig[name] = ptr_types[name]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    consts = dict(constexprs)
    for name in ("stride_qd", "stride_kd", "stride_vd", "stride_od"):
        if name in sig:
            consts[name] = 1
    for name in consts:
        sig[name] = "constexpr"
    # constexpr-only parameters (BLOCK_M, ...) follow the runtime arguments in the kernel signature
    all_names = list(arg_names) + [k for k in constexprs if k not in arg_names]
    sig = {name: sig.get(name, "constexpr") for name in all_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(all_names)
        if name in aligned and sig[name] != "constexpr"
    }
    return CompileTarget(
        module=__name__,
        kernel=kernel,
        variant=variant,
        dtype=_DTYPE_NAME[dtype],
        signature=sig,
        constexprs=consts,
        attrs=attrs,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        capability=cc,
        needs_tensor_cores=True,
    )


def compile_targets(capabilities=(80, 90)) -> List[CompileTarget]:
    """Every (kernel, signature, constexprs, num_warps, num_stages, capability) dispatch can choose.

    Coverage: BLOCK_D in (16, 32, 64, 128, 256) with BLOCK_DV == BLOCK_D (configs are chosen by
    max(D, Dv), so the equal-width variant is the register-heaviest of its bucket), fp16 / bf16 / fp32,
    for each capability (fp32 only up to BLOCK_D 128, see supports()); the forward kernel also for
    its one codegen-changing flag IS_CAUSAL (it decides which key tiles are visited and masked):
    14 (BLOCK_D, dtype) x 2 cc x (2 forward + 1 scores) = 84 targets. Varlen, LSE writing, key bias,
    the scores mode and the scores kernel's causal mask are runtime arguments (scalar loads / masks),
    so they add no variants and every compiled variant contains those paths. UPCAST is interpreter-only (False here).
    """
    out = []
    for cc in capabilities:
        for dtype in SUPPORTED_DTYPES:
            p = _TL_PTR[dtype]
            for bd in BLOCK_DS:
                if dtype == torch.float32 and bd > 128:
                    continue  # not offered on the GPU, see supports()
                cfg = select_config(bd, dtype, cc, causal=False)
                sc_ptrs = {
                    "Q": p,
                    "K": p,
                    "Bias": "*fp32",
                    "Lse": "*fp32",
                    "Scores": "*fp32",
                    "CuQ": "*i32",
                    "CuK": "*i32",
                }
                out.append(
                    _target(
                        "_attn_scores_kernel",
                        SCORES_ARGS,
                        f"D{bd}",
                        dtype,
                        sc_ptrs,
                        dict(
                            BLOCK_M=cfg["SCORES_BLOCK_M"],
                            BLOCK_N=cfg["BLOCK_N"],
                            BLOCK_D=bd,
                            UPCAST=False,
                            DOT_PRECISION=dot_precision(dtype, False),
                        ),
                        dict(cfg, num_warps=cfg["SCORES_WARPS"], num_stages=1),
                        cc,
                        aligned=set(sc_ptrs) | {a for a in SCORES_ARGS if a.startswith("stride_")},
                    )
                )
                for causal in (False, True):
                    cfg = select_config(bd, dtype, cc, causal=causal)
                    variant = f"D{bd}" + ("-causal" if causal else "")
                    fwd_ptrs = {
                        "Q": p,
                        "K": p,
                        "V": p,
                        "Out": p,
                        "Bias": "*fp32",
                        "Lse": "*fp32",
                        "CuQ": "*i32",
                        "CuK": "*i32",
                    }
                    out.append(
                        _target(
                            "_attn_fwd_kernel",
                            FWD_ARGS,
                            variant,
                            dtype,
                            fwd_ptrs,
                            dict(
                                BLOCK_M=cfg["BLOCK_M"],
                                BLOCK_N=cfg["BLOCK_N"],
                                BLOCK_D=bd,
                                BLOCK_DV=bd,
                                IS_CAUSAL=causal,
                                UPCAST=False,
                                DOT_PRECISION=dot_precision(dtype, False),
                            ),
                            cfg,
                            cc,
                            aligned=set(fwd_ptrs) | {a for a in FWD_ARGS if a.startswith("stride_")},
                        )
                    )
    return out


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _dummy(device, dtype):
    return torch.empty(1, device=device, dtype=dtype)


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
    *,
    config=None,
) -> None:
    """Run the Triton kernels per docs/attention_kernel_contract.md (writes out4 / lse3 / scores2).

    ``config`` (optional, for tests / benchmarks) overrides keys of :func:`select_config`'s answer.
    """
    device = q4.device
    ok, why = supports(q4.dtype, q4.shape[3], v4.shape[3], device.type)
    if not ok:
        raise ValueError(f"Triton attention backend cannot run this call: {why}")
    interpret = interpreter_active() or device.type == "cpu"
    kern = _kernels(interpret)

    Bq, Hq, Sq, D = q4.shape
    Bk, Hkv, Sk, _ = k4.shape
    Dv = v4.shape[3]
    varlen = cu_seqlens_q is not None
    nseq = (cu_seqlens_q.shape[0] - 1) if varlen else Bq
    if nseq == 0:
        return
    group = Hq // Hkv
    capability = None if interpret else torch.cuda.get_device_capability(device)
    cfg = dict(select_config(max(D, Dv), q4.dtype, capability, causal))
    if config:
        cfg.update(config)
    BD, BDV = block_d(D), block_d(Dv)
    qk_scale = float(scale) * LOG2E
    prec = dot_precision(q4.dtype, interpret)

    f32_dummy = _dummy(device, torch.float32)
    if varlen:
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        cu_q = cu_k = _dummy(device, torch.int32)

    want_scores = scores_mode != SCORES_NONE and scores2 is not None
    lse = lse3
    if lse is None and want_scores:
        lse = torch.empty(out4.shape[:3], device=device, dtype=torch.float32)
    lse_t = lse if lse is not None else f32_dummy
    lse_strides = lse.stride() if lse is not None else (0, 0, 0)
    bias_t = bias3 if bias3 is not None else f32_dummy
    bias_strides = bias3.stride() if bias3 is not None else (0, 0, 0)
    launch = {} if interpret else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    if max_seqlen_q > 0 and max_seqlen_k >= 0:
        grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), Hq, nseq)
        kern._attn_fwd_kernel[grid](
            q4,
            k4,
            v4,
            bias_t,
            out4,
            lse_t,
            cu_q,
            cu_k,
            *q4.stride(),
            *k4.stride(),
            *v4.stride(),
            *bias_strides,
            *out4.stride(),
            *lse_strides,
            Sq,
            Sk,
            D // 8,
            Dv // 8,
            group,
            qk_scale,
            int(varlen),
            int(lse is not None),
            int(bias3 is not None),
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=BD,
            BLOCK_DV=BDV,
            IS_CAUSAL=bool(causal),
            UPCAST=interpret,
            DOT_PRECISION=prec,
            **launch,
        )

    if want_scores and max_seqlen_k > 0:
        grid = (triton.cdiv(max_seqlen_k, cfg["BLOCK_N"]), nseq)
        kern._attn_scores_kernel[grid](
            q4,
            k4,
            bias_t,
            lse_t,
            scores2,
            cu_q,
            cu_k,
            *q4.stride(),
            *k4.stride(),
            *bias_strides,
            *lse_strides,
            *scores2.stride(),
            Sq,
            Sk,
            Hq,
            D // 8,
            group,
            qk_scale,
            int(varlen),
            int(scores_mode),
            int(bias3 is not None),
            int(bool(causal)),
            BLOCK_M=cfg["SCORES_BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=BD,
            UPCAST=interpret,
            DOT_PRECISION=prec,
            **({} if interpret else dict(num_warps=cfg["SCORES_WARPS"], num_stages=1)),
        )
