"""Triton backend of the token-reduction primitives (see reference.py for what each one computes).

Kernels
-------
* ``_inv_norm_kernel``: ``1 / max(||metric_t||, 1e-12)`` per token, in fp32 (a tiny pre-pass of tome_plan);
  NaN for a token whose row holds a NaN / inf: its similarities are NaN, which count as ``-inf``.
* ``_tome_match_kernel``: one program per (block of A tokens, batch row). A tokens are the even positions
  ``>= protect_first``, B tokens the odd ones. The program walks B tile by tile; each tile's similarities are
  ``sum over C-chunks of tl.dot(A_chunk, B_chunk^T)`` (fp32 accumulation), scaled by the B tokens' inverse
  norms. A running (max, argmax) per A token keeps the first maximum: ``tl.argmax`` picks the lowest index
  inside a tile, and a later tile replaces the running best only when strictly greater. The ``|A| x |B|``
  matrix is never stored. Output: best similarity (times the A token's inverse norm) and the best B index.
* ``_select_rank_kernel`` + ``_select_compact_kernel`` (select_tokens, and tome_plan's choice of the ``r``
  A tokens, which is the same "k largest, ties to the lower index, ascending" rule): the rank of every
  candidate ``i >= p`` is ``#{j >= p : s_j > s_i or (s_j == s_i and j < i)}``, counted tile by tile (exact
  and deterministic: no sort, no atomics). NaN counts as larger than every number, as in ``torch.sort``.
  ``i`` is kept when ``i < p`` or ``rank_i < k - p``. The compaction pass (one program per row) turns the
  keep flags into output slots with a running ``tl.cumsum`` and writes each kept index to its slot.
* ``_tome_merge_kernel``: one program per (block of output slots, block of channels, batch row). The
  sources of every slot come from a CSR built with torch ops (a stable sort of ``src_to_out``: sources in
  ascending position). Each program walks its slots' sources in that fixed order and accumulates
  ``size * x`` and ``size`` in fp32 (fp64 for float64 inputs): deterministic, no atomics.
* ``_gather_rows_kernel``: ``out[b, t, :] = x[b, idx[b, t], :]`` (gather_tokens; tome_unmerge is the
  same gather with ``idx = src_to_out``). It copies bits: every dtype is viewed as the integer type of its
  width, so one compiled variant per element size serves all dtypes of that size. Out-of-range indices
  (possible only on CUDA, where api.py does not check them to avoid a sync) read zeros instead of faulting.

Dtypes: tome_plan takes float16 / bfloat16 / float32 metrics (float64 is the reference's job); the others
also take float64 (gather / unmerge any dtype of 1, 2, 4 or 8 bytes). Any strides, any N and C.

Interpreter
-----------
CPU tensors run in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first imported, as
tests/conftest.py does), with small blocks so that the multi-tile paths are exercised. There the dot
operands are upcast to fp32 (``UPCAST``: bf16 ``tl.dot`` is unreliable in the interpreter), and bfloat16
merge outputs are written in fp32 and rounded by torch (the interpreter truncates fp32 -> bf16).

``compile_targets()`` lists every kernel variant the launchers can pick, for the AOT compile gate
(``python -m mmkernels.compile_gate``).
"""

from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import torch

from .._triton_support import (
    CompileTarget,
    interpreter_active,
    is_available,  # noqa: F401
    tl,
    triton,
)

PLAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------------------------
# Availability / mode helpers
# ----------------------------------------------------------------------------------------------
def _module_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules[__name__]._gather_rows_kernel, InterpretedFunction)


def _check_mode(device: torch.device) -> bool:
    """True when the kernels run interpreted; raises if the import-time mode does not fit the device."""
    interpret = device.type == "cpu" or interpreter_active()
    if _module_is_interpreted() != interpret:
        if interpret:
            raise RuntimeError(
                "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (tests/conftest.py does)."
            )
        raise RuntimeError(
            "Triton kernels were imported with TRITON_INTERPRET=1 and cannot be compiled in "
            "this process; run the compile in a process without it."
        )
    return interpret


def supports(op: str, dtype: torch.dtype, device_type: str) -> Tuple[bool, str]:
    """Whether this backend takes ``op`` on a tensor of ``dtype`` on ``device_type``; (False, why) if not."""
    ok, why = is_available()
    if not ok:
        return False, why
    if device_type not in ("cpu", "cuda"):
        return False, f"runs CUDA tensors only (CPU under TRITON_INTERPRET=1), got {device_type}"
    if op == "tome_plan" and dtype not in PLAN_DTYPES:
        return False, f"metric dtype {dtype} not supported (float16, bfloat16, float32)"
    if op in ("tome_merge", "select_tokens") and dtype not in FLOAT_DTYPES:
        return False, f"dtype {dtype} not supported (float16, bfloat16, float32, float64)"
    if op in ("tome_unmerge", "gather_tokens") and (dtype.is_complex or dtype.itemsize not in _BITS):
        return False, f"dtype {dtype} not supported (real dtypes of 1, 2, 4 or 8 bytes)"
    if device_type == "cpu" and not _module_is_interpreted():
        return False, "CPU tensors need TRITON_INTERPRET=1 set before triton is first imported"
    return True, ""


# ----------------------------------------------------------------------------------------------
# Kernels (defined only when triton imports)
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _inv_norm_kernel(
        X,
        InvNorm,
        n_tokens,
        n_chan,
        stride_xb,
        stride_xn,
        stride_xc,
        stride_ib,
        stride_in,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """InvNorm[b, t] = 1 / max(||X[b, t, :]||_2, 1e-12), accumulated in fp32; NaN for a token
        whose row holds a NaN or inf (its similarities are NaN, i.e. -inf: reference.py)."""
        pid_t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.arange(0, BLOCK_C)
        t_ok = offs_t < n_tokens
        row = X + b * stride_xb + offs_t.to(tl.int64)[:, None] * stride_xn
        sq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for c0 in range(0, n_chan, BLOCK_C):
            c = c0 + offs_c
            v = tl.load(row + c[None, :] * stride_xc, mask=t_ok[:, None] & (c[None, :] < n_chan), other=0.0).to(
                tl.float32
            )
            # + v * 0 (exactly 0 for finite v): a NaN or inf makes sq NaN, not just inf
            sq += tl.sum(v * v + v * 0.0, 1)
        norm = tl.maximum(tl.sqrt_rn(sq), 1e-12)
        inv = tl.div_rn(tl.full([BLOCK_T], 1.0, tl.float32), norm)
        tl.store(InvNorm + b * stride_ib + offs_t * stride_in, tl.where(sq == sq, inv, float("nan")), mask=t_ok)

    @triton.jit
    def _tome_match_kernel(
        X,
        InvNorm,
        BestSim,
        BestIdx,
        stride_xb,
        stride_xn,
        stride_xc,
        stride_ib,
        stride_in,
        n_a,
        n_b,
        a_first,
        b_first,
        n_chan,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Per A token: max over B tokens of the cosine similarity, and its first argmax (B index).

        A token t sits at position a_first + 2t, B token u at b_first + 2u. BestSim / BestIdx are
        contiguous (B, n_a) fp32 / int32.
        """
        pid_a = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
        offs_u = tl.arange(0, BLOCK_B)
        offs_c = tl.arange(0, BLOCK_C)
        a_ok = offs_a < n_a
        a_pos = (a_first + 2 * offs_a).to(tl.int64)
        X_row = X + b * stride_xb
        a_ptrs = X_row + a_pos[:, None] * stride_xn + offs_c[None, :] * stride_xc  # (BLOCK_A, BLOCK_C)

        best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
        best_u = tl.zeros([BLOCK_A], dtype=tl.int32)
        for u0 in range(0, n_b, BLOCK_B):
            u = u0 + offs_u
            u_ok = u < n_b
            b_pos = (b_first + 2 * u).to(tl.int64)
            bt_ptrs = X_row + b_pos[None, :] * stride_xn + offs_c[:, None] * stride_xc  # (BLOCK_C, BLOCK_B)
            acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
            for c0 in range(0, n_chan, BLOCK_C):
                c_ok = (c0 + offs_c) < n_chan
                a = tl.load(a_ptrs + c0 * stride_xc, mask=a_ok[:, None] & c_ok[None, :], other=0.0)
                bt = tl.load(bt_ptrs + c0 * stride_xc, mask=c_ok[:, None] & u_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    bt = bt.to(tl.float32)
                acc = tl.dot(a, bt, acc, input_precision="ieee")
            inv_b = tl.load(InvNorm + b * stride_ib + b_pos * stride_in, mask=u_ok, other=0.0)
            sim = acc * inv_b[None, :]
            sim = tl.where(u_ok[None, :] & (sim == sim), sim, float("-inf"))  # NaN: never the best
            tile_best = tl.max(sim, 1)
            tile_u = tl.argmax(sim, 1, tie_break_left=True).to(tl.int32) + u0
            better = tile_best > best  # strictly: an earlier tile keeps its tie
            best_u = tl.where(better, tile_u, best_u)
            best = tl.where(better, tile_best, best)
        inv_a = tl.load(InvNorm + b * stride_ib + a_pos * stride_in, mask=a_ok, other=0.0)
        # An A token with a NaN / inf in its row: every similarity NaN -> -inf, first B token.
        a_bad = inv_a != inv_a
        out = b * n_a + offs_a
        tl.store(BestSim + out, tl.where(a_bad, float("-inf"), best * inv_a), mask=a_ok)
        tl.store(BestIdx + out, tl.where(a_bad, 0, best_u), mask=a_ok)

    @triton.jit
    def _greater(x, y):
        """x ranks before y in a descending sort (NaN largest, as torch.sort)."""
        return (x > y) | ((x != x) & (y == y))

    @triton.jit
    def _select_rank_kernel(
        S,
        Keep,
        n,
        protect,
        n_rest_keep,
        stride_sb,
        stride_sn,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        WIDE: tl.constexpr,
    ):
        """Keep[b, i] = i < protect or #{j >= protect ranking before i} < n_rest_keep (int32 0/1)."""
        pid_i = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_j = tl.arange(0, BLOCK_J)
        i_ok = offs_i < n
        S_row = S + b * stride_sb
        if WIDE:
            si = tl.load(S_row + offs_i * stride_sn, mask=i_ok, other=0.0).to(tl.float64)
        else:
            si = tl.load(S_row + offs_i * stride_sn, mask=i_ok, other=0.0).to(tl.float32)
        i_nan = si != si
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(protect, n, BLOCK_J):
            j = j0 + offs_j
            j_ok = j < n
            if WIDE:
                sj = tl.load(S_row + j * stride_sn, mask=j_ok, other=0.0).to(tl.float64)
            else:
                sj = tl.load(S_row + j * stride_sn, mask=j_ok, other=0.0).to(tl.float32)
            a = sj[None, :]
            c = si[:, None]
            tie = (a == c) | ((a != a) & i_nan[:, None])
            before = _greater(a, c) | (tie & (j[None, :] < offs_i[:, None]))
            rank += tl.sum((before & j_ok[None, :]).to(tl.int32), 1)
        keep = (offs_i < protect) | (rank < n_rest_keep)
        tl.store(Keep + b * n + offs_i, keep.to(tl.int32), mask=i_ok)

    @triton.jit
    def _select_compact_kernel(Keep, Out, n, k, BLOCK: tl.constexpr):
        """Out[b, slot] = i for every kept i, slots in ascending i (running prefix sum over tiles)."""
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
        for i0 in range(0, n, BLOCK):
            i = i0 + offs
            flag = tl.load(Keep + b * n + i, mask=i < n, other=0)
            slot = tl.cumsum(flag, 0) + carry - 1
            tl.store(Out + b * k + slot, i.to(tl.int64), mask=(flag != 0) & (slot < k))
            carry += tl.sum(flag, 0)

    @triton.jit
    def _tome_merge_kernel(
        X,
        W,
        CsrSrc,
        CsrOff,
        Out,
        SizeOut,
        stride_xb,
        stride_xn,
        stride_xc,
        n,
        n_out,
        n_chan,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
        WIDE: tl.constexpr,
    ):
        """Out[b, s] = sum_{i -> s} W_i X_i / sum_{i -> s} W_i over the CSR sources of slot s.

        W (B, n) holds the sizes in the compute dtype; CsrSrc (B, n) the sources grouped by slot (ascending
        within a slot), CsrOff (B, n_out + 1) the group offsets; all three contiguous. Out (B, n_out, C)
        and SizeOut (B, n_out) are contiguous.
        """
        pid_s = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        s_ok = offs_s < n_out
        c_ok = offs_c < n_chan
        start = tl.load(CsrOff + b * (n_out + 1) + offs_s, mask=s_ok, other=0)
        count = tl.load(CsrOff + b * (n_out + 1) + offs_s + 1, mask=s_ok, other=0) - start
        if WIDE:
            acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float64)
            wsum = tl.zeros([BLOCK_S], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
            wsum = tl.zeros([BLOCK_S], dtype=tl.float32)
        X_row = X + b * stride_xb
        longest = tl.max(count, 0)
        for j in range(0, longest):
            live = j < count
            src = tl.load(CsrSrc + b * n + start + j, mask=live, other=0)
            w = tl.load(W + b * n + src, mask=live, other=0.0)
            x = tl.load(
                X_row + src[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                mask=live[:, None] & c_ok[None, :],
                other=0.0,
            )
            acc += w[:, None] * x.to(acc.dtype)
            wsum += w
        out = acc / tl.where(s_ok, wsum, 1.0)[:, None]  # padding slots: no 0/0
        tl.store(
            Out + (b * n_out + offs_s)[:, None] * n_chan + offs_c[None, :],
            out.to(Out.dtype.element_ty),
            mask=s_ok[:, None] & c_ok[None, :],
        )
        tl.store(SizeOut + b * n_out + offs_s, wsum, mask=s_ok & (pid_c == 0))

    @triton.jit
    def _gather_rows_kernel(
        X,
        Idx,
        Out,
        n_src,
        n_idx,
        n_chan,
        stride_xb,
        stride_xn,
        stride_xc,
        stride_ib,
        stride_it,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Out[b, t, :] = X[b, Idx[b, t], :] (Out contiguous); out-of-range indices give zeros."""
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        t_ok = offs_t < n_idx
        c_ok = offs_c < n_chan
        src = tl.load(Idx + b * stride_ib + offs_t * stride_it, mask=t_ok, other=0)
        in_range = (src >= 0) & (src < n_src)
        x = tl.load(
            X + b * stride_xb + src[:, None] * stride_xn + offs_c[None, :] * stride_xc,
            mask=(t_ok & in_range)[:, None] & c_ok[None, :],
            other=0,
        )
        tl.store(Out + (b * n_idx + offs_t)[:, None] * n_chan + offs_c[None, :], x, mask=t_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Configs: one per kernel (and dtype width), no autotuning
# ----------------------------------------------------------------------------------------------
def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, int(x) - 1).bit_length()))


def select_config(kernel: str, dtype: torch.dtype, interpret: bool) -> Dict[str, int]:
    """Launch config of one kernel. Interpreter: small tiles (cheap, and multi-tile paths get exercised)."""
    if interpret:
        return {
            "match": dict(BLOCK_A=16, BLOCK_B=16, BLOCK_C=16),
            "inv_norm": dict(BLOCK_T=16, BLOCK_C=16),
            "rank": dict(BLOCK_I=32, BLOCK_J=32),
            "compact": dict(BLOCK=32),
            "merge": dict(BLOCK_S=16, BLOCK_C=16),
            "gather": dict(BLOCK_T=16, BLOCK_C=32),
        }[kernel] | dict(num_warps=4, num_stages=1)
    if kernel == "match":
        # fp32 dots are exact-fp32 FMA dots ("ieee", no TF32: ties and near-ties must rank as in fp32)
        if dtype == torch.float32:
            return dict(BLOCK_A=64, BLOCK_B=64, BLOCK_C=16, num_warps=4, num_stages=2)
        return dict(BLOCK_A=64, BLOCK_B=64, BLOCK_C=32, num_warps=8, num_stages=2)
    if kernel == "inv_norm":
        return dict(BLOCK_T=32, BLOCK_C=64, num_warps=4, num_stages=1)
    if kernel == "rank":
        return dict(BLOCK_I=64, BLOCK_J=64, num_warps=4, num_stages=1)
    if kernel == "compact":
        return dict(BLOCK=1024, num_warps=4, num_stages=1)
    if kernel == "merge":
        return dict(BLOCK_S=16, BLOCK_C=64 if dtype == torch.float64 else 128, num_warps=4, num_stages=1)
    if kernel == "gather":
        return dict(BLOCK_T=16, BLOCK_C=max(32, 256 // dtype.itemsize), num_warps=4, num_stages=1)
    raise KeyError(kernel)


def _launch(cfg: Dict[str, int], interpret: bool) -> Dict[str, int]:
    return {} if interpret else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _blocks(cfg: Dict[str, int]) -> Dict[str, int]:
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}


# ----------------------------------------------------------------------------------------------
# Launchers (the backend functions: same signatures and results as reference.py)
# ----------------------------------------------------------------------------------------------
def _require(op: str, t: torch.Tensor) -> bool:
    ok, why = supports(op, t.dtype, t.device.type)
    if not ok:
        raise ValueError(f"Triton reduce backend cannot run {op}: {why}")
    return _check_mode(t.device)


def _topk_ascending(scores: torch.Tensor, k: int, protect_first: int, interpret: bool) -> torch.Tensor:
    """select_tokens' kernels on a (B, n) tensor: (B, k) int64 ascending."""
    b, n = scores.shape
    out = torch.empty(b, k, dtype=torch.int64, device=scores.device)
    if b == 0 or k == 0:
        return out
    keep = torch.empty(b, n, dtype=torch.int32, device=scores.device)
    cfg = select_config("rank", scores.dtype, interpret)
    _select_rank_kernel[(triton.cdiv(n, cfg["BLOCK_I"]), b)](
        scores,
        keep,
        n,
        protect_first,
        k - protect_first,
        *scores.stride(),
        WIDE=scores.dtype == torch.float64,
        **_blocks(cfg),
        **_launch(cfg, interpret),
    )
    cfg = select_config("compact", scores.dtype, interpret)
    _select_compact_kernel[(b,)](keep, out, n, k, **_blocks(cfg), **_launch(cfg, interpret))
    return out


def select_tokens(scores: torch.Tensor, k: int, protect_first: int = 1) -> torch.Tensor:
    interpret = _require("select_tokens", scores)
    return _topk_ascending(scores, k, protect_first, interpret)


def tome_plan(metric: torch.Tensor, r: int, protect_first: int = 1):
    interpret = _require("tome_plan", metric)
    b, n, c = metric.shape
    device = metric.device
    a_first = protect_first + (protect_first % 2)
    b_first = protect_first + 1 - (protect_first % 2)
    n_a = len(range(a_first, n, 2))
    n_b = len(range(b_first, n, 2))
    positions = torch.arange(n, device=device)
    if r == 0 or n_b == 0 or b == 0:
        src_idx = torch.zeros(b, 0, dtype=torch.int64, device=device)
        dst_idx = torch.zeros(b, 0, dtype=torch.int64, device=device)
    else:
        inv_norm = torch.empty(b, n, dtype=torch.float32, device=device)
        cfg = select_config("inv_norm", metric.dtype, interpret)
        _inv_norm_kernel[(triton.cdiv(n, cfg["BLOCK_T"]), b)](
            metric, inv_norm, n, c, *metric.stride(), *inv_norm.stride(), **_blocks(cfg), **_launch(cfg, interpret)
        )
        best_sim = torch.empty(b, n_a, dtype=torch.float32, device=device)
        best_u = torch.empty(b, n_a, dtype=torch.int32, device=device)
        cfg = select_config("match", metric.dtype, interpret)
        _tome_match_kernel[(triton.cdiv(n_a, cfg["BLOCK_A"]), b)](
            metric,
            inv_norm,
            best_sim,
            best_u,
            *metric.stride(),
            *inv_norm.stride(),
            n_a,
            n_b,
            a_first,
            b_first,
            c,
            UPCAST=interpret,
            **_blocks(cfg),
            **_launch(cfg, interpret),
        )
        # the r best A tokens (ties: lower A position), ascending: select_tokens' rule on best_sim
        chosen = _topk_ascending(best_sim, r, 0, interpret)
        src_idx = a_first + 2 * chosen
        dst_idx = b_first + 2 * best_u.gather(1, chosen).long()
    # Index maps, as reference.py builds them, with device-side torch ops only (no host sync).
    r_eff = src_idx.shape[1]
    merged = torch.zeros(b, n, dtype=torch.bool, device=device)
    merged.scatter_(1, src_idx, True)
    slot = torch.cumsum(~merged, dim=1) - 1
    src_to_out = slot.clone()
    src_to_out.scatter_(1, src_idx, slot.gather(1, dst_idx))
    # survivors scatter their position to their slot; merged tokens go to a spare last column
    target = torch.where(merged, torch.full_like(slot, n - r_eff), slot)
    keep_idx = torch.empty(b, n - r_eff + 1, dtype=torch.int64, device=device)
    keep_idx.scatter_(1, target, positions.expand(b, n).contiguous())
    return src_to_out, keep_idx[:, : n - r_eff], src_idx, dst_idx


def tome_merge(x: torch.Tensor, src_to_out: torch.Tensor, n_out: int, size: torch.Tensor):
    interpret = _require("tome_merge", x)
    b, n, c = x.shape
    device = x.device
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    # CSR of sources per slot: a stable sort keeps the sources of a slot in ascending position
    src_to_out = src_to_out.long()
    csr_src = torch.sort(src_to_out, dim=1, stable=True).indices.contiguous()
    counts = torch.zeros(b, n_out, dtype=torch.int64, device=device)
    counts.scatter_add_(1, src_to_out, torch.ones_like(src_to_out))
    csr_off = torch.zeros(b, n_out + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=1, out=csr_off[:, 1:])
    w = size.to(compute).contiguous()
    # the interpreter truncates fp32 -> bf16: write fp32 there and let torch round
    out_dtype = torch.float32 if (interpret and x.dtype == torch.bfloat16) else x.dtype
    out = torch.empty(b, n_out, c, dtype=out_dtype, device=device)
    size_out = torch.empty(b, n_out, dtype=compute, device=device)
    if b and n_out:
        cfg = select_config("merge", x.dtype, interpret)
        grid = (triton.cdiv(n_out, cfg["BLOCK_S"]), max(1, triton.cdiv(c, cfg["BLOCK_C"])), b)
        _tome_merge_kernel[grid](
            x,
            w,
            csr_src,
            csr_off,
            out,
            size_out,
            *x.stride(),
            n,
            n_out,
            c,
            WIDE=compute == torch.float64,
            **_blocks(cfg),
            **_launch(cfg, interpret),
        )
    return out.to(x.dtype), size_out.to(size.dtype)


def _gather(x: torch.Tensor, idx: torch.Tensor, interpret: bool) -> torch.Tensor:
    b, n_src, c = x.shape
    k = idx.shape[1]
    out = torch.empty(b, k, c, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bits = _BITS[x.element_size()]
    xv, ov = x.view(bits), out.view(bits)
    idx = idx.long()
    cfg = select_config("gather", x.dtype, interpret)
    grid = (triton.cdiv(k, cfg["BLOCK_T"]), triton.cdiv(c, cfg["BLOCK_C"]), b)
    _gather_rows_kernel[grid](
        xv, idx, ov, n_src, k, c, *xv.stride(), *idx.stride(), **_blocks(cfg), **_launch(cfg, interpret)
    )
    return out


def tome_unmerge(x_out: torch.Tensor, src_to_out: torch.Tensor) -> torch.Tensor:
    interpret = _require("tome_unmerge", x_out)
    return _gather(x_out, src_to_out, interpret)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    interpret = _require("gather_tokens", x)
    return _gather(x, idx, interpret)


# ----------------------------------------------------------------------------------------------
# AOT compile targets (for mmkernels.compile_gate)
# ----------------------------------------------------------------------------------------------
_TL = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}


def compiled_kernel(name: str):
    """The compiled (not interpreted) kernel ``name``, for the compile gate."""
    if _module_is_interpreted():
        raise RuntimeError("compile targets need a process without TRITON_INTERPRET=1")
    return getattr(sys.modules[__name__], name)


def _make_target(
    kernel, args, types, constexprs, cfg, cc, dtype, variant, aligned=(), needs_tensor_cores=False
) -> CompileTarget:
    """args: runtime argument names in kernel order; types: {name: triton type} (default i32)."""
    consts = dict(constexprs, **_blocks(cfg))
    names = list(args) + list(consts)
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in aligned}
    blocks = "x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK"))
    label = f"{_TL[dtype]} {variant} {blocks} w{cfg['num_warps']}s{cfg['num_stages']}".replace("  ", " ")
    return CompileTarget(
        module=__name__,
        kernel=kernel,
        variant=variant,
        dtype=_TL[dtype],
        signature=sig,
        constexprs=consts,
        attrs=attrs,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        capability=cc,
        needs_tensor_cores=needs_tensor_cores,
        label=label,
    )


def compile_targets(capabilities=(80, 90)) -> List[CompileTarget]:
    """Every kernel variant the launchers can pick, per capability:

    inv_norm and match x (fp16, bf16, fp32) metric; rank x (fp16, bf16, fp32, fp64) scores; compact;
    merge x (fp16, bf16, fp32, fp64); gather x (1, 2, 4, 8-byte elements) = 20 per capability. The match
    kernel's fp16 / bf16 dots must use tensor cores. Pointers are marked 16-byte aligned (what the JIT
    specialises for torch allocations); strides stay plain i32 (the common case of odd C included).
    """
    out = []
    for cc in capabilities:
        for dt in PLAN_DTYPES:
            p = "*" + _TL[dt]
            cfg = select_config("inv_norm", dt, False)
            out.append(
                _make_target(
                    "_inv_norm_kernel",
                    [
                        "X",
                        "InvNorm",
                        "n_tokens",
                        "n_chan",
                        "stride_xb",
                        "stride_xn",
                        "stride_xc",
                        "stride_ib",
                        "stride_in",
                    ],
                    {"X": p, "InvNorm": "*fp32"},
                    {},
                    cfg,
                    cc,
                    dt,
                    "inv_norm",
                    aligned={"X", "InvNorm"},
                )
            )
            cfg = select_config("match", dt, False)
            out.append(
                _make_target(
                    "_tome_match_kernel",
                    [
                        "X",
                        "InvNorm",
                        "BestSim",
                        "BestIdx",
                        "stride_xb",
                        "stride_xn",
                        "stride_xc",
                        "stride_ib",
                        "stride_in",
                        "n_a",
                        "n_b",
                        "a_first",
                        "b_first",
                        "n_chan",
                    ],
                    {"X": p, "InvNorm": "*fp32", "BestSim": "*fp32", "BestIdx": "*i32"},
                    {"UPCAST": False},
                    cfg,
                    cc,
                    dt,
                    "match",
                    aligned={"X", "InvNorm", "BestSim", "BestIdx"},
                    needs_tensor_cores=dt != torch.float32,
                )
            )
        for dt in FLOAT_DTYPES:
            cfg = select_config("rank", dt, False)
            out.append(
                _make_target(
                    "_select_rank_kernel",
                    ["S", "Keep", "n", "protect", "n_rest_keep", "stride_sb", "stride_sn"],
                    {"S": "*" + _TL[dt], "Keep": "*i32"},
                    {"WIDE": dt == torch.float64},
                    cfg,
                    cc,
                    dt,
                    "rank",
                    aligned={"S", "Keep"},
                )
            )
            cfg = select_config("merge", dt, False)
            wide = dt == torch.float64
            acc = "*fp64" if wide else "*fp32"
            out.append(
                _make_target(
                    "_tome_merge_kernel",
                    [
                        "X",
                        "W",
                        "CsrSrc",
                        "CsrOff",
                        "Out",
                        "SizeOut",
                        "stride_xb",
                        "stride_xn",
                        "stride_xc",
                        "n",
                        "n_out",
                        "n_chan",
                    ],
                    {
                        "X": "*" + _TL[dt],
                        "W": acc,
                        "CsrSrc": "*i64",
                        "CsrOff": "*i64",
                        "Out": "*" + _TL[dt],
                        "SizeOut": acc,
                    },
                    {"WIDE": wide},
                    cfg,
                    cc,
                    dt,
                    "merge",
                    aligned={"X", "W", "CsrSrc", "CsrOff", "Out", "SizeOut"},
                )
            )
        cfg = select_config("compact", torch.int32, False)
        out.append(
            _make_target(
                "_select_compact_kernel",
                ["Keep", "Out", "n", "k"],
                {"Keep": "*i32", "Out": "*i64"},
                {},
                cfg,
                cc,
                torch.int32,
                "compact",
                aligned={"Keep", "Out"},
            )
        )
        for size, it in _BITS.items():
            p = "*" + _TL[it]
            cfg = select_config("gather", it, False)
            out.append(
                _make_target(
                    "_gather_rows_kernel",
                    [
                        "X",
                        "Idx",
                        "Out",
                        "n_src",
                        "n_idx",
                        "n_chan",
                        "stride_xb",
                        "stride_xn",
                        "stride_xc",
                        "stride_ib",
                        "stride_it",
                    ],
                    {"X": p, "Idx": "*i64", "Out": p},
                    {},
                    cfg,
                    cc,
                    it,
                    "gather",
                    aligned={"X", "Idx", "Out"},
                )
            )
    return out
