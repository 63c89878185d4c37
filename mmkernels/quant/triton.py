"""Triton backend of ``mmkernels.qmatmul``: weight-only int8 / int4 / fp8 and W8A8 (int8, fp8).

Speed targets (GPU; written down, NOT claimed: no GPU has measured them yet; the bench script
``python -m mmkernels.benchmarks.qmatmul_gpu`` measures them when one is present)
--------------------------------------------------------------------------------------------------
* int4 weight-only decode (batch M = 1 .. 16, fp16 / bf16 activations, group 128): >= 3x the
  speed of the fp16 cuBLAS GEMM/GEMV (``torch.nn.functional.linear`` on the dequantized fp16
  weight) on A100 and H100, at LLM / VLM layer shapes (4096 x 4096, 4096 x 11008, 11008 x 4096).
  The CUDA kernel of csrc/cuda/qgemv_int4.cu serves M <= 8 when the extension is built; this file
  serves the rest.
* W8A8 int8 and fp8 prefill (M >= 256): >= 1.4x the bf16 cuBLAS GEMM at the same shapes,
  activation quantization included.

Kernels (all read the weight's storage as bytes: ``qweight.view(torch.uint8)``)
--------------------------------------------------------------------------------------------------
* ``_wo_gemm_kernel`` (weight-only, M >= 16): one program per (BLOCK_M, BLOCK_N) output tile, tiles
  visited in GROUP_M bands (L2 reuse, as in the Triton matmul tutorial). Per K step the weight tile
  ``(BLOCK_N, BLOCK_K)`` is loaded as bytes, int4 nibbles are split with shifts / masks and
  interleaved back into element order, the zero point is subtracted and the result converted
  (``_dequant``) and the tile is scaled in registers (``BLOCK_K`` = 32, the smallest group, so a
  step never spans two groups; per-channel weights are one group of K). Then ``tl.dot(x, w^T)``
  with fp32 accumulation: fp16 / bf16 operands (tensor cores), fp32 x as "tf32x3" (split TF32,
  about fp32 accuracy).
* ``_wo_gemv_kernel`` (weight-only, M < 16): split-K. Grid (N blocks, K splits); each program
  streams its K range of BLOCK_N weight rows in BLOCK_K = 32 steps (32 is the smallest group, so a
  step never spans two groups), unrolled UNROLL times. M <= 4 (BLOCK_M 1 or 4): CUDA-core FMAs into
  a per-lane (BLOCK_M, BLOCK_N, BLOCK_K) fp32 accumulator, reduced over K once at the end.
  5 <= M < 16: the rows are padded to a 16-row tile and multiplied with ``tl.dot`` (tensor cores).
  Each program writes fp32 partial sums to a (splits, M, N) workspace.
* ``_splitk_reduce_kernel``: sums the partials over the splits in a fixed order (deterministic:
  no atomics), applies the epilogue (W8A8 scales, bias) and casts to the output dtype.
* ``_act_quant_kernel`` (W8A8): one program per BLOCK_M token rows (1 on the GPU); pass 1 the
  absmax of ``x / smooth`` (NaN-propagating: a row with a NaN / inf gets ``s_x = NaN``), pass 2
  ``x_q = round_half_even(x / s_x)`` (int8) or the e4m3 encoding of ``x / s_x`` (fp8). Divisions
  are IEEE (``tl.div_rn``) and rounding is done by hand
  (``_round_half_even``: Triton's ``rint`` needs libdevice, absent from the interpreter), so
  ``x_q`` and ``s_x`` are bit-identical to reference.quantize_activations[_fp8]. For int8 it also
  writes the row sums of ``x_q`` (used for asymmetric weights, below).
* Performance notes (not measured): the GEMV splits K to give about 4 programs per SM and its
  int -> float dequantization avoids I2F (``_dequant``); the decode GEMV is still launched as two
  kernels (GEMV + reduce), a few microseconds that a CUDA graph hides. Weight-only smoothing
  (``smooth`` without ``act_bits``) divides x with a torch op before the kernel.
* ``_w8a8_gemm_kernel`` (M >= 16): int8: ``tl.dot(int8, int8) -> int32`` (IMMA / IGMMA). Symmetric
  weights feed the dot as stored; asymmetric uint8 weights as ``q - 128`` (one XOR), corrected in
  the epilogue by ``(128 - z) * rowsum(x_q)``: exact integer arithmetic throughout. fp8: on sm_89+
  a native e4m3 x e4m3 dot (QGMMA on sm_90); on sm_80 (no fp8 datapath) both operands are decoded
  to fp16 (exact: e4m3 is a subset of fp16) for an fp16 dot with fp32 accumulation, which gives the
  same products. Epilogue ``acc * s_x * s_w + bias`` in fp32, fused.
* ``_w8a8_gemv_kernel`` (M < 16): the split-K GEMV on quantized activations (int32 partials for
  int8), followed by ``_splitk_reduce_kernel`` with the scales.

fp8 bytes are decoded with integer operations (``_e4m3_to_f32``) rather than Triton's fp8 type,
which sm_80 lacks: weight-only fp8 therefore runs on sm_80 too; ``_f32_to_e4m3`` encodes.

Configs: ``select_config(kind, m, n, k, dtype, capability, ...)`` picks one explicit config per
shape class (M bucket, GPU generation, format); the interpreter gets one small config per kernel.
``compile_targets()`` lists every variant the dispatcher can pick for the AOT compile gate
(``python -m mmkernels.compile_gate``).

Interpreter: CPU tensors run under ``TRITON_INTERPRET=1`` (set before triton is imported, as
tests/conftest.py does). There ``UPCAST`` turns every dot operand into fp32 (bf16 dots are
unreliable when interpreted) and outputs are written in fp32 and rounded by torch (the interpreter
truncates fp32 -> bf16).
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
from .packing import FP8_DTYPE, is_fp8

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Weight storage formats (the W_FMT constexpr).
FMT_INT8, FMT_INT4, FMT_FP8 = 0, 1, 2
FMT_NAMES = {FMT_INT8: "int8", FMT_INT4: "int4", FMT_FP8: "fp8"}
GEMV_MAX_M = 15  # M < 16: split-K GEMV; M >= 16: GEMM
SUB_K = 32  # smallest group size: the K step of the weight-only kernels


# ----------------------------------------------------------------------------------------------
# Kernels (defined only when triton imports)
# ----------------------------------------------------------------------------------------------
if triton is not None:
    # --- small helpers ------------------------------------------------------------------------

    @triton.jit
    def _round_half_even(v):
        """Round float32 to the nearest integer, ties to even (torch.round), without libdevice.

        ``v - floor(v)`` is exact for |v| < 2**23, so the comparisons with 0.5 are exact too.
        """
        r = tl.floor(v)
        d = v - r
        r_odd = (r - 2.0 * tl.floor(0.5 * r)) == 1.0
        return tl.where((d > 0.5) | ((d == 0.5) & r_odd), r + 1.0, r)

    @triton.jit
    def _e4m3_to_f32(b):
        """OCP e4m3 bit patterns (int32 holding 0..255) -> their exact float32 values.

        The 7 exponent + mantissa bits, shifted left by 7, sit where an fp16 keeps its exponent
        (bias 15) and mantissa: read as fp16 that is the e4m3 value (bias 7) times 2**-8. It also
        holds for e4m3 subnormals (exponent 0), which become fp16 subnormals. So: shift, reinterpret
        as fp16, multiply by 256. Integer operations only (sm_80 has no fp8 type).
        """
        h = ((b & 0x7F) << 7) | ((b & 0x80) << 8)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def _f32_to_e4m3(v):
        """float32 in [-448, 448] -> the e4m3 bit pattern (int32 0..255) of its round-to-nearest,
        ties-to-even value (what torch's ``.to(torch.float8_e4m3fn)`` gives).

        The magnitude is rounded on the e4m3 grid of its binade: spacing 2**(e - 3) for exponent
        e >= -6, and the subnormal spacing 2**-9 below. Scaling by powers of two is exact, so the
        only rounding is ``_round_half_even``. The bits are then read back with the fp16 trick of
        ``_e4m3_to_f32`` run backwards (divide by 256, reinterpret, shift).
        """
        a = tl.abs(v)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # -127 for zero
        e = tl.maximum(e, -6)
        inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # 2**(3 - e)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3)
        r = _round_half_even(a * inv_step) * step  # exact e4m3 value, >= 0
        h = (r * 0.00390625).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        sign = (v.to(tl.int32, bitcast=True) >> 24) & 0x80  # -0.0 keeps its sign
        return ((h >> 7) & 0x7F) | sign

    @triton.jit
    def _load_weight(Wq, offs_n, n_ok, k0, k_hi, stride_wn, BLOCK_K: tl.constexpr, W_FMT: tl.constexpr):
        """Stored values of W[offs_n, k0 : k0 + BLOCK_K] as int32 (BLOCK_N, BLOCK_K): the bytes
        (int8 / fp8) or the unsigned nibbles (int4). Columns >= k_hi read 0."""
        rows = Wq + offs_n.to(tl.int64)[:, None] * stride_wn
        if W_FMT == 1:  # int4: byte j holds element 2j (low nibble) and 2j + 1 (high nibble)
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(rows + offs_b[None, :], mask=n_ok[:, None] & (offs_b[None, :] < k_hi // 2), other=0).to(
                tl.int32
            )
            # the two nibble planes, interleaved back into element order (a register shuffle)
            return tl.interleave(b & 0xF, b >> 4)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            return tl.load(rows + offs_k[None, :], mask=n_ok[:, None] & (offs_k[None, :] < k_hi), other=0).to(tl.int32)

    @triton.jit
    def _dequant(raw, zero, zero_xor, W_FMT: tl.constexpr):
        """(q - z) as float32 for integer formats, the e4m3 value for fp8; not yet scaled.

        Integer formats: ``raw ^ zero_xor`` is an unsigned value u in [0, 255] with q - z = u - zero
        (symmetric int8 / int4: flip the sign bit and take 128 / 8 as the zero point; asymmetric:
        zero_xor = 0). u is OR-ed into the mantissa of 2**23 and 2**23 + zero subtracted: exact,
        and two cheap float ops instead of an int -> float conversion (quarter rate on the GPU).
        """
        if W_FMT == 2:
            return _e4m3_to_f32(raw)
        else:
            u = ((raw ^ zero_xor) | 0x4B000000).to(tl.float32, bitcast=True)
            return u - (zero.to(tl.float32) + 8388608.0)[:, None]

    @triton.jit
    def _signed_byte(v):
        """int32 holding a byte 0..255 -> its two's-complement value (-128..127)."""
        return (v << 24) >> 24

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of this program: GROUP_M row tiles sweep the column tiles together, so
        that the weight tiles they share stay in L2 (the Triton matmul tutorial's ordering)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_band = GROUP_M * num_n
        first_m = (pid // per_band) * GROUP_M
        band_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_band) % band_rows
        pid_n = (pid % per_band) // band_rows
        return pid_m, pid_n

    # --- weight-only GEMM (prefill) -------------------------------------------------------------

    @triton.jit
    def _wo_gemm_kernel(
        X,
        Wq,
        S,
        Zp,
        Bias,
        Out,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_om,
        n_groups,
        group_size,
        zero_xor,
        has_zeros,
        has_bias,
        W_FMT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Out[M, N] = X[M, K] @ W_hat[N, K]^T + bias. S / Zp: (N, n_groups) fp32 / uint8 (Zp read
        only when has_zeros); BLOCK_K divides group_size (one group per K step; per channel:
        group_size = K)."""
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        s_row = S + offs_n * n_groups
        z_row = Zp + offs_n * n_groups
        z_ok = n_ok & (has_zeros != 0)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=m_ok[:, None] & ((k0 + offs_k)[None, :] < K), other=0.0)
            g = k0 // group_size
            zero = tl.load(z_row + g, mask=z_ok, other=0).to(tl.int32) + zero_xor
            w = _dequant(
                _load_weight(Wq, offs_n, n_ok, k0, K, stride_wn, BLOCK_K, W_FMT), zero, zero_xor, W_FMT
            )  # (BLOCK_N, BLOCK_K) fp32
            w = w * tl.load(s_row + g, mask=n_ok, other=0.0)[:, None]
            if UPCAST:
                x = x.to(tl.float32)
            else:
                w = w.to(X.dtype.element_ty)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk

        acc += tl.load(Bias + offs_n, mask=n_ok & (has_bias != 0), other=0.0)[None, :]
        out_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    # --- weight-only split-K GEMV (decode) ----------------------------------------------------

    @triton.jit
    def _wo_gemv_kernel(
        X,
        Wq,
        S,
        Zp,
        Part,
        M,
        N,
        K,
        k_per_split,
        stride_xm,
        stride_xk,
        stride_wn,
        n_groups,
        group_size,
        zero_xor,
        has_zeros,
        W_FMT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UNROLL: tl.constexpr,
        USE_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Part[split, m, n] = sum over this split's K range of X[m, k] W_hat[n, k] (fp32).

        BLOCK_K = 32 divides every group size, so each step has one scale per row.
        """
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        s_row = S + offs_n * n_groups
        z_row = Zp + offs_n * n_groups
        z_ok = n_ok & (has_zeros != 0)

        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:  # per-lane partial sums, reduced over K once after the loop
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k_start in range(k_lo, k_hi, BLOCK_K * UNROLL):
            for u in tl.static_range(UNROLL):
                k0 = k_start + u * BLOCK_K
                k = k0 + offs_k
                x = tl.load(x_rows + k[None, :] * stride_xk, mask=m_ok[:, None] & (k[None, :] < k_hi), other=0.0)
                g = k0 // group_size
                step_ok = k0 < k_hi  # the last unrolled steps may fall past the range
                zero = tl.load(z_row + g, mask=z_ok & step_ok, other=0).to(tl.int32) + zero_xor
                scale = tl.load(s_row + g, mask=n_ok & step_ok, other=0.0)
                w = (
                    _dequant(_load_weight(Wq, offs_n, n_ok, k0, k_hi, stride_wn, BLOCK_K, W_FMT), zero, zero_xor, W_FMT)
                    * scale[:, None]
                )
                if USE_DOT:
                    if UPCAST:
                        acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=PRECISION)
                    else:
                        acc = tl.dot(x, tl.trans(w.to(X.dtype.element_ty)), acc, input_precision=PRECISION)
                else:
                    acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
        if USE_DOT:
            part = acc
        else:
            part = tl.sum(acc, axis=2)
        rows = (pid_s * M + offs_m).to(tl.int64)
        tl.store(Part + rows[:, None] * N + offs_n[None, :], part, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _splitk_reduce_kernel(
        Part, Out, Sx, Sw, Bias, M, N, n_splits, stride_om, has_scales, has_bias, BLOCK: tl.constexpr
    ):
        """Out[m, n] = (sum_s Part[s, m, n]) [* Sx[m] * Sw[n]] [+ Bias[n]], splits summed in order
        (deterministic; exact for int32 partials)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        total = M * N
        ok = offs < total
        m = offs // N
        n = offs % N
        acc = tl.zeros((BLOCK,), dtype=Part.dtype.element_ty)
        for s in range(0, n_splits):
            acc += tl.load(Part + s * total + offs, mask=ok, other=0)
        y = acc.to(tl.float32)
        # Without scales / bias the loads are masked off: y * 1.0 * 1.0 + 0.0 changes nothing.
        use_scales = ok & (has_scales != 0)
        y = y * tl.load(Sx + m, mask=use_scales, other=1.0) * tl.load(Sw + n, mask=use_scales, other=1.0)
        y = y + tl.load(Bias + n, mask=ok & (has_bias != 0), other=0.0)
        tl.store(Out + m.to(tl.int64) * stride_om + n, y.to(Out.dtype.element_ty), mask=ok)

    # --- W8A8: activation quantization -------------------------------------------------------

    @triton.jit
    def _load_act(x_rows, Smooth, row_ok, k, K, stride_xk, HAS_SMOOTH: tl.constexpr):
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=row_ok[:, None] & (k[None, :] < K), other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.div_rn(x, tl.load(Smooth + k, mask=k < K, other=1.0)[None, :])
        return x

    @triton.jit
    def _act_quant_kernel(
        X,
        Smooth,
        Xq,
        Sx,
        RowSum,
        M,
        K,
        stride_xm,
        stride_xk,
        FP8: tl.constexpr,
        HAS_SMOOTH: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Per-token symmetric quantization of BLOCK_M rows of X (M, K) (divided by Smooth first):
        Xq (M, K) int8 (or e4m3 bytes when FP8), Sx (M,) fp32, RowSum (M,) int32 (sum of Xq)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok = offs_m < M
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        # pass 1: absmax of each (smoothed) row, as the integer max of |x|'s bits: NaN > inf >
        # every finite value, so a NaN is never dropped (a float max drops it on the GPU)
        amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            x = _load_act(x_rows, Smooth, row_ok, k0 + offs_k, K, stride_xk, HAS_SMOOTH)
            amax = tl.maximum(amax, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        amax_row = tl.max(amax, 1).to(tl.float32, bitcast=True)
        if FP8:
            qmax = 448.0
        else:
            qmax = 127.0
        scale = tl.where(amax_row > 0, tl.div_rn(amax_row, qmax), 1.0)
        # a NaN / inf in the row: s_x = NaN, the output row is NaN (x_q is 0; docs/nan_semantics.md)
        finite = amax_row < float("inf")
        scale = tl.where(finite, scale, float("nan"))

        # pass 2: x / s_x, rounded like torch (IEEE division, ties to even), clamped
        q_rows = Xq + offs_m.to(tl.int64)[:, None] * K
        rsum = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            ok = row_ok[:, None] & (k[None, :] < K)
            v = tl.div_rn(_load_act(x_rows, Smooth, row_ok, k, K, stride_xk, HAS_SMOOTH), scale[:, None])
            v = tl.where(finite[:, None], v, 0.0)
            if FP8:
                q = _f32_to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0))
                tl.store(q_rows + k[None, :], q.to(tl.uint8), mask=ok)
            else:
                q = tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0).to(tl.int32)
                tl.store(q_rows + k[None, :], q.to(tl.int8), mask=ok)
                rsum += q
        tl.store(Sx + offs_m, scale, mask=row_ok)
        tl.store(RowSum + offs_m, tl.sum(rsum, 1), mask=row_ok)

    # --- W8A8 GEMM (prefill) -----------------------------------------------------------------

    @triton.jit
    def _w8a8_gemm_kernel(
        Xq,
        Wq,
        Sx,
        Sw,
        Zp,
        RowSum,
        Bias,
        Out,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        has_bias,
        FP8: tl.constexpr,
        ASYM: tl.constexpr,
        FP8_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Out = (Xq @ (Wq - z)^T) * Sx[:, None] * Sw[None, :] + bias (per-channel weights).

        int8: Xq int8 (M, K); Wq int8 (sym) or uint8 (ASYM, zero points Zp (N,)), int32 dot.
        fp8: Xq / Wq e4m3 (FP8_DOT: as float8e4nv, else as bytes decoded to fp16), fp32 dot.
        """
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = Xq + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = Wq + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
        if FP8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            if FP8_DOT:  # float8e4nv pointers: the fill value must be a float
                xq = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wq = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            else:
                xq = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
                wq = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            if FP8:
                if FP8_DOT:
                    acc = tl.dot(xq, tl.trans(wq), acc)
                else:
                    xf = _e4m3_to_f32(xq.to(tl.int32))
                    wf = _e4m3_to_f32(wq.to(tl.int32))
                    if not UPCAST:  # exact: every e4m3 value is an fp16 value
                        xf = xf.to(tl.float16)
                        wf = wf.to(tl.float16)
                    acc = tl.dot(xf, tl.trans(wf), acc, input_precision="ieee")
            else:
                if ASYM:  # uint8 q -> int8 (q - 128); the 128 - z part is added below
                    wq = (wq ^ 0x80).to(tl.int8, bitcast=True)
                acc = tl.dot(xq, tl.trans(wq), acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if ASYM:
            zero = tl.load(Zp + offs_n, mask=n_ok, other=0).to(tl.int32)
            rsum = tl.load(RowSum + offs_m, mask=m_ok, other=0)
            acc += rsum[:, None] * (128 - zero)[None, :]
        sx = tl.load(Sx + offs_m, mask=m_ok, other=0.0)
        sw = tl.load(Sw + offs_n, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        y = y + tl.load(Bias + offs_n, mask=n_ok & (has_bias != 0), other=0.0)[None, :]
        out_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    # --- W8A8 split-K GEMV (decode) ----------------------------------------------------------

    @triton.jit
    def _w8a8_gemv_kernel(
        Xq,
        Wq,
        Zp,
        RowSum,
        Part,
        M,
        N,
        K,
        k_per_split,
        stride_xm,
        stride_wn,
        w_xor,
        has_zeros,
        FP8: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UNROLL: tl.constexpr,
        USE_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Part[split, m, n] = sum over the split's K range of Xq[m, k] (Wq[n, k] - z[n]), int32
        (exact) for int8, fp32 for fp8 (exact products). Wq bytes; int8 weights are read as
        signed bytes o = (byte ^ w_xor) (w_xor = 128 for uint8 asym), q - z = o + (w_xor - z)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        k_lo = pid_s * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        x_rows = Xq + offs_m.to(tl.int64)[:, None] * stride_xm
        corr = w_xor - tl.load(Zp + offs_n, mask=n_ok & (has_zeros != 0), other=0).to(tl.int32)

        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=Part.dtype.element_ty)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=Part.dtype.element_ty)
        for k_start in range(k_lo, k_hi, BLOCK_K * UNROLL):
            for u in tl.static_range(UNROLL):
                k = k_start + u * BLOCK_K + offs_k
                xb = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k[None, :] < k_hi), other=0)
                wb = _load_weight(Wq, offs_n, n_ok, k_start + u * BLOCK_K, k_hi, stride_wn, BLOCK_K, 0)
                if FP8:
                    xf = _e4m3_to_f32(xb.to(tl.int32))
                    wf = _e4m3_to_f32(wb)
                    if USE_DOT:
                        if not UPCAST:
                            xf = xf.to(tl.float16)
                            wf = wf.to(tl.float16)
                        acc = tl.dot(xf, tl.trans(wf), acc, input_precision="ieee")
                    else:
                        acc += xf[:, None, :] * wf[None, :, :]
                else:
                    o = _signed_byte(wb ^ w_xor)
                    if USE_DOT:  # int8 operands; (w_xor - z) * rowsum is added after the loop
                        acc = tl.dot(xb, tl.trans(o.to(tl.int8)), acc, out_dtype=tl.int32)
                    else:
                        acc += xb.to(tl.int32)[:, None, :] * (o + corr[:, None])[None, :, :]
        if USE_DOT:
            part = acc
            if not FP8:  # sum_k x (o + corr) = dot + corr * rowsum(x): the whole row, once
                rsum = tl.load(RowSum + offs_m, mask=m_ok & (pid_s == 0), other=0)
                part += rsum[:, None] * corr[None, :]
        else:
            part = tl.sum(acc, axis=2)
        rows = (pid_s * M + offs_m).to(tl.int64)
        tl.store(Part + rows[:, None] * N + offs_n[None, :], part, mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Compiled vs interpreted kernels
# ----------------------------------------------------------------------------------------------
def _module_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules[__name__]._wo_gemm_kernel, InterpretedFunction)


def _kernels(interpret: bool):
    """This module, after checking its kernels were decorated in the requested mode (Triton fixes
    compiled-vs-interpreted when it is first imported; see mmkernels/attention/triton.py)."""
    if _module_is_interpreted() != interpret:
        if interpret:
            raise RuntimeError(
                "Triton kernels on CPU tensors need the interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported "
                "(tests/conftest.py does)."
            )
        raise RuntimeError(
            "Triton kernels were imported with TRITON_INTERPRET=1 and cannot be "
            "compiled in this process; run the compile in a process without it."
        )
    return sys.modules[__name__]


def compiled_kernel(name: str):
    """The compiled (not interpreted) kernel ``name``, for the compile gate."""
    return getattr(_kernels(False), name)


# ----------------------------------------------------------------------------------------------
# Support and configs
# ----------------------------------------------------------------------------------------------
def supports(dtype: torch.dtype, device_type: str) -> Tuple[bool, str]:
    """Whether this backend takes x of ``dtype`` on ``device_type``; (False, reason) if not.
    Every weight format (int8 / int4 / fp8, any group size, sym / asym) and W8A8 (int8, fp8) is
    supported; fp8 runs on sm_80 too (decoded to fp16 there, see the module docstring)."""
    ok, why = is_available()
    if not ok:
        return False, why
    if device_type not in ("cpu", "cuda"):
        return False, f"runs CUDA tensors only (CPU under TRITON_INTERPRET=1), got {device_type}"
    if dtype not in SUPPORTED_DTYPES:
        return False, (
            f"x dtype {str(dtype).replace('torch.', '')} not supported (float16, "
            f"bfloat16, float32; float64 is the reference's)"
        )
    if device_type == "cpu" and not _module_is_interpreted():
        return False, "CPU tensors need TRITON_INTERPRET=1 set before triton is first imported"
    if device_type == "cuda" and not interpreter_active():
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return False, f"needs a GPU of compute capability >= 8.0, got {major}.{minor}"
    return True, ""


def _cc_int(capability) -> Optional[int]:
    if capability is None:
        return None
    if isinstance(capability, (tuple, list)):
        return int(capability[0]) * 10 + int(capability[1])
    return int(capability)


def m_bucket(m: int) -> str:
    """Shape class of the token count: 'm1', 'm4' (2-4), 'm16' (5-15: GEMV on a 16-row dot tile),
    'small' (16-64), 'large' (> 64)."""
    if m <= 1:
        return "m1"
    if m <= 4:
        return "m4"
    if m <= GEMV_MAX_M:
        return "m16"
    return "small" if m <= 64 else "large"


def select_config(
    kind: str, m: int, n: int, k: int, dtype: torch.dtype, capability, group_size: int = 0, fmt: int = FMT_INT8
) -> Dict[str, int]:
    """Launch config of one kernel for a shape class; ``capability`` None means the interpreter.

    kind: 'wo_gemm', 'wo_gemv', 'w8a8_gemm', 'w8a8_gemv', 'act_quant', 'reduce'. One explicit
    config per class (no autotuning); every config reachable here is compiled and checked by the
    compile gate (``compile_targets``). ``n`` and ``k`` set the split-K count (see ``split_k``),
    not the config; ``group_size`` does not change it either (every K step is 32 wide, the
    smallest group), ``fmt`` only for fp8 W8A8 without an fp8 datapath.
    """
    del n, k, group_size
    cc = _cc_int(capability)
    bucket = m_bucket(m)
    gemv_m = {"m1": 1, "m4": 4}.get(bucket, 16)
    if cc is None:  # interpreter: one small config per kernel, multi-tile paths exercised
        if kind == "wo_gemm":
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
        if kind == "w8a8_gemm":
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
        if kind in ("wo_gemv", "w8a8_gemv"):
            return dict(BLOCK_M=gemv_m, BLOCK_N=32, BLOCK_K=SUB_K, UNROLL=2, num_warps=4, num_stages=1)
        if kind == "act_quant":
            return dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=1)
        if kind == "reduce":
            return dict(BLOCK=128, num_warps=4, num_stages=1)
        raise KeyError(kind)

    hopper = cc >= 90
    if kind == "wo_gemm":
        # BLOCK_K = 32 (the smallest group) for every format, so one variant per (format, bucket,
        # dtype) serves all group sizes and per-channel weights
        if dtype == torch.float32:  # tf32x3 keeps hi / lo operand halves
            if bucket == "small":
                return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=SUB_K, GROUP_M=8, num_warps=4, num_stages=3)
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=SUB_K, GROUP_M=8, num_warps=4, num_stages=3)
        if bucket == "small":
            return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=SUB_K, GROUP_M=8, num_warps=4, num_stages=4 if hopper else 3)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=SUB_K, GROUP_M=8, num_warps=8, num_stages=4 if hopper else 3)
    if kind in ("wo_gemv", "w8a8_gemv"):
        if gemv_m == 1:
            return dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=SUB_K, UNROLL=4, num_warps=4, num_stages=1)
        if gemv_m == 4:
            return dict(BLOCK_M=4, BLOCK_N=32, BLOCK_K=SUB_K, UNROLL=4, num_warps=4, num_stages=1)
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=SUB_K, UNROLL=2, num_warps=4, num_stages=1)
    if kind == "w8a8_gemm":
        if fmt == FMT_FP8 and cc < 89:  # fp16-decoded operands: fp16-sized tiles
            if bucket == "small":
                return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
            return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        if bucket == "small":  # Hopper: 64 rows, the smallest warpgroup MMA (IGMMA / QGMMA)
            return dict(
                BLOCK_M=64 if hopper else 32,
                BLOCK_N=64,
                BLOCK_K=128,
                GROUP_M=8,
                num_warps=4,
                num_stages=4 if hopper else 3,
            )
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4 if hopper else 3)
    if kind == "act_quant":  # one row per program: 1024 columns per step, 8 per thread
        return dict(BLOCK_M=1, BLOCK_K=1024, num_warps=4, num_stages=1)
    if kind == "reduce":
        return dict(BLOCK=512, num_warps=4, num_stages=1)
    raise KeyError(kind)


_SM_COUNT: Dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_k(n: int, k: int, block_n: int, step: int, sms: int) -> Tuple[int, int]:
    """(splits, k_per_split) for the GEMV: about 4 programs per SM, each split a multiple of
    ``step`` (= BLOCK_K * UNROLL, so split boundaries are group boundaries) and none empty."""
    n_blocks = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, step)
    splits = max(1, min(steps, triton.cdiv(4 * sms, n_blocks)))
    k_per_split = triton.cdiv(steps, splits) * step
    return triton.cdiv(k, k_per_split), k_per_split


def dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """``input_precision`` of the dots with float x: fp32 x on the GPU -> "tf32x3" (split TF32,
    about fp32 accuracy on tensor cores); otherwise "ieee" (16-bit operands ignore it)."""
    return "tf32x3" if (dtype == torch.float32 and not interpret) else "ieee"


_DUMMIES: Dict[tuple, torch.Tensor] = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for a pointer argument the kernel never reads (cached: decode calls
    are short enough for an allocation per call to show)."""
    key = (str(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


def _blocks(cfg: Dict[str, int]) -> Dict[str, int]:
    return {key: v for key, v in cfg.items() if key.isupper()}


def _launch(cfg: Dict[str, int], interpret: bool) -> Dict[str, int]:
    return {} if interpret else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ----------------------------------------------------------------------------------------------
# Launcher (the backend function: same signature and result as reference.qmatmul_tensors)
# ----------------------------------------------------------------------------------------------
def weight_format(qweight: torch.Tensor, bits: int) -> int:
    if is_fp8(qweight):
        return FMT_FP8
    return FMT_INT4 if bits == 4 else FMT_INT8


def qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    bits: int,
    bias: Optional[torch.Tensor] = None,
    act_bits: Optional[int] = None,
    smooth: Optional[torch.Tensor] = None,
    *,
    config: Optional[Dict[str, int]] = None,
) -> torch.Tensor:
    """``x (..., K) @ W_hat.T + bias -> (..., N)`` in x.dtype (see reference.qmatmul_tensors).

    ``config`` (tests / benchmarks) overrides keys of the GEMM / GEMV :func:`select_config` answer.
    """
    device = x.device
    ok, why = supports(x.dtype, device.type)
    if not ok:
        raise ValueError(f"Triton qmatmul backend cannot run this call: {why}")
    interpret = interpreter_active() or device.type == "cpu"
    kern = _kernels(interpret)
    capability = None if interpret else torch.cuda.get_device_capability(device)
    n = qweight.shape[0]
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    # the interpreter truncates fp32 -> bf16 / fp16 stores: write fp32 there and let torch round
    out = torch.empty(m, n, dtype=torch.float32 if interpret else x.dtype, device=device)
    if m == 0 or n == 0:
        return out.to(x.dtype).reshape(*lead, n)

    fmt = weight_format(qweight, bits)
    group_size = k // scales.shape[1]  # per channel: K
    symmetric = zeros is None
    f32_dummy = _dummy(device, torch.float32)
    zp = _dummy(device, torch.uint8) if symmetric else zeros
    bias_t = f32_dummy if bias is None else bias.to(torch.float32).contiguous()
    wbytes = qweight.view(torch.uint8)
    sms = 2 if interpret else _sm_count(device)

    if act_bits is None:
        if smooth is not None:  # SmoothQuant factors without activation quantization: divide here
            x2 = (x2.to(torch.float32) / smooth.to(torch.float32)).to(x.dtype)
        # symmetric formats flip the sign bit and use the midpoint as the zero point
        zero_xor = 0 if (not symmetric or fmt == FMT_FP8) else (8 if fmt == FMT_INT4 else 128)
        prec = dot_precision(x.dtype, interpret)
        common = dict(W_FMT=fmt, UPCAST=interpret, PRECISION=prec)
        if m > GEMV_MAX_M:
            cfg = dict(select_config("wo_gemm", m, n, k, x.dtype, capability, group_size, fmt), **(config or {}))
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            kern._wo_gemm_kernel[grid](
                x2,
                wbytes,
                scales,
                zp,
                bias_t,
                out,
                m,
                n,
                k,
                x2.stride(0),
                x2.stride(1),
                wbytes.stride(0),
                out.stride(0),
                scales.shape[1],
                group_size,
                zero_xor,
                int(not symmetric),
                int(bias is not None),
                **common,
                **_blocks(cfg),
                **_launch(cfg, interpret),
            )
        else:
            cfg = dict(select_config("wo_gemv", m, n, k, x.dtype, capability), **(config or {}))
            splits, k_per_split = split_k(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"] * cfg["UNROLL"], sms)
            part = torch.empty(splits, m, n, dtype=torch.float32, device=device)
            kern._wo_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
                x2,
                wbytes,
                scales,
                zp,
                part,
                m,
                n,
                k,
                k_per_split,
                x2.stride(0),
                x2.stride(1),
                wbytes.stride(0),
                scales.shape[1],
                group_size,
                zero_xor,
                int(not symmetric),
                USE_DOT=cfg["BLOCK_M"] >= 16,
                **common,
                **_blocks(cfg),
                **_launch(cfg, interpret),
            )
            _reduce(kern, part, out, f32_dummy, f32_dummy, bias_t, False, bias is not None, capability, interpret)
        return out.to(x.dtype).reshape(*lead, n)

    # --- W8A8 (per-channel 8-bit weights; api.py checked) -------------------------------------
    fp8 = fmt == FMT_FP8
    xq = torch.empty(m, k, dtype=torch.uint8 if fp8 else torch.int8, device=device)
    sx = torch.empty(m, dtype=torch.float32, device=device)
    rowsum = torch.empty(m, dtype=torch.int32, device=device)
    smooth_t = f32_dummy if smooth is None else smooth.to(torch.float32).contiguous()
    cfg = select_config("act_quant", m, n, k, x.dtype, capability)
    kern._act_quant_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x2,
        smooth_t,
        xq,
        sx,
        rowsum,
        m,
        k,
        x2.stride(0),
        x2.stride(1),
        FP8=fp8,
        HAS_SMOOTH=smooth is not None,
        **_blocks(cfg),
        **_launch(cfg, interpret),
    )
    sw = scales  # (N, 1) contiguous: element n at offset n
    if m > GEMV_MAX_M:
        fp8_dot = fp8 and not interpret and _cc_int(capability) >= 89
        cfg = dict(select_config("w8a8_gemm", m, n, k, x.dtype, capability, 0, fmt), **(config or {}))
        if fp8_dot:
            xin, win = xq.view(FP8_DTYPE), qweight
        else:
            xin, win = xq, (wbytes if (fp8 or not symmetric) else qweight)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        kern._w8a8_gemm_kernel[grid](
            xin,
            win,
            sx,
            sw,
            zp,
            rowsum,
            bias_t,
            out,
            m,
            n,
            k,
            xq.stride(0),
            win.stride(0),
            out.stride(0),
            int(bias is not None),
            FP8=fp8,
            ASYM=not symmetric,
            FP8_DOT=fp8_dot,
            UPCAST=interpret,
            **_blocks(cfg),
            **_launch(cfg, interpret),
        )
    else:
        cfg = dict(select_config("w8a8_gemv", m, n, k, x.dtype, capability), **(config or {}))
        splits, k_per_split = split_k(n, k, cfg["BLOCK_N"], cfg["BLOCK_K"] * cfg["UNROLL"], sms)
        part = torch.empty(splits, m, n, dtype=torch.float32 if fp8 else torch.int32, device=device)
        w_xor = 0 if symmetric else 128
        kern._w8a8_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
            xq,
            wbytes,
            zp,
            rowsum,
            part,
            m,
            n,
            k,
            k_per_split,
            xq.stride(0),
            wbytes.stride(0),
            w_xor,
            int(not symmetric),
            FP8=fp8,
            USE_DOT=cfg["BLOCK_M"] >= 16,
            UPCAST=interpret,
            **_blocks(cfg),
            **_launch(cfg, interpret),
        )
        _reduce(kern, part, out, sx, sw, bias_t, True, bias is not None, capability, interpret)
    return out.to(x.dtype).reshape(*lead, n)


def _reduce(kern, part, out, sx, sw, bias_t, has_scales, has_bias, capability, interpret):
    splits, m, n = part.shape
    cfg = select_config("reduce", m, n, 0, out.dtype, capability)
    kern._splitk_reduce_kernel[(triton.cdiv(m * n, cfg["BLOCK"]),)](
        part,
        out,
        sx,
        sw,
        bias_t,
        m,
        n,
        splits,
        out.stride(0),
        int(has_scales),
        int(has_bias),
        **_blocks(cfg),
        **_launch(cfg, interpret),
    )


def quantize_activations(
    x2: torch.Tensor, fp8: bool = False, smooth: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, ...]:
    """The activation-quantization kernel alone (tests / benchmarks): ``(x_q, s_x, rowsum)`` for a
    2-D ``x2``; x_q int8, or float8_e4m3fn when ``fp8``."""
    device = x2.device
    interpret = interpreter_active() or device.type == "cpu"
    kern = _kernels(interpret)
    m, k = x2.shape
    xq = torch.empty(m, k, dtype=torch.uint8 if fp8 else torch.int8, device=device)
    sx = torch.empty(m, dtype=torch.float32, device=device)
    rowsum = torch.empty(m, dtype=torch.int32, device=device)
    if m:
        smooth_t = _dummy(device, torch.float32) if smooth is None else smooth.to(torch.float32).contiguous()
        capability = None if interpret else torch.cuda.get_device_capability(device)
        cfg = select_config("act_quant", m, 0, k, x2.dtype, capability)
        kern._act_quant_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            x2,
            smooth_t,
            xq,
            sx,
            rowsum,
            m,
            k,
            x2.stride(0),
            x2.stride(1),
            FP8=fp8,
            HAS_SMOOTH=smooth is not None,
            **_blocks(cfg),
            **_launch(cfg, interpret),
        )
    return (xq.view(FP8_DTYPE) if fp8 else xq), sx, rowsum


# ----------------------------------------------------------------------------------------------
# AOT compile targets (for mmkernels.compile_gate)
# ----------------------------------------------------------------------------------------------
_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

WO_GEMM_ARGS = [
    "X",
    "Wq",
    "S",
    "Zp",
    "Bias",
    "Out",
    "M",
    "N",
    "K",
    "stride_xm",
    "stride_xk",
    "stride_wn",
    "stride_om",
    "n_groups",
    "group_size",
    "zero_xor",
    "has_zeros",
    "has_bias",
]
WO_GEMV_ARGS = [
    "X",
    "Wq",
    "S",
    "Zp",
    "Part",
    "M",
    "N",
    "K",
    "k_per_split",
    "stride_xm",
    "stride_xk",
    "stride_wn",
    "n_groups",
    "group_size",
    "zero_xor",
    "has_zeros",
]
REDUCE_ARGS = ["Part", "Out", "Sx", "Sw", "Bias", "M", "N", "n_splits", "stride_om", "has_scales", "has_bias"]
ACT_ARGS = ["X", "Smooth", "Xq", "Sx", "RowSum", "M", "K", "stride_xm", "stride_xk"]
W8A8_GEMM_ARGS = [
    "Xq",
    "Wq",
    "Sx",
    "Sw",
    "Zp",
    "RowSum",
    "Bias",
    "Out",
    "M",
    "N",
    "K",
    "stride_xm",
    "stride_wn",
    "stride_om",
    "has_bias",
]
W8A8_GEMV_ARGS = [
    "Xq",
    "Wq",
    "Zp",
    "RowSum",
    "Part",
    "M",
    "N",
    "K",
    "k_per_split",
    "stride_xm",
    "stride_wn",
    "w_xor",
    "has_zeros",
]
# 16-byte aligned in the common case (torch allocations, K / N / group sizes multiples of 16):
# what Triton's JIT specialises, i.e. the vectorised, register-heaviest form.
_ALIGNED = {
    "X",
    "Wq",
    "S",
    "Zp",
    "Bias",
    "Out",
    "Part",
    "Sx",
    "Sw",
    "RowSum",
    "Xq",
    "Smooth",
    "N",
    "K",
    "k_per_split",
    "stride_xm",
    "stride_wn",
    "stride_om",
    "group_size",
}
# Tensor-core instructions a dot kernel must show in SASS (compile_gate.tensor_core_ops names).
TC_FLOAT = ("HMMA", "HGMMA")
TC_INT8 = ("IMMA", "IGMMA")
TC_FP8_SM90 = ("QGMMA",)


def _target(kernel, args, types, constexprs, cfg, cc, dtype_name, variant, tc=()):
    consts = dict(constexprs, **_blocks(cfg))
    names = list(args) + list(consts)
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in _ALIGNED and sig[a] != "constexpr"}
    blocks = "x".join(str(consts[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK") if b in consts)
    label = f"{dtype_name} {variant} {blocks} w{cfg['num_warps']}s{cfg['num_stages']}"
    return CompileTarget(
        module=__name__,
        kernel=kernel,
        variant=variant,
        dtype=dtype_name,
        signature=sig,
        constexprs=consts,
        attrs=attrs,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        capability=cc,
        needs_tensor_cores=bool(tc),
        label=label,
        tensor_core_ops=tuple(tc),
    )


def compile_targets(capabilities=(80, 90)) -> List[CompileTarget]:
    """Every (kernel, constexprs, dtypes, config, capability) the launcher can pick.

    Per capability: weight-only GEMM: 3 formats (int8, int4, fp8; sym / asym, the group size and
    per-channel are runtime arguments) x 2 M buckets x 3 x dtypes = 18; weight-only
    GEMV: 3 formats x 3 M buckets (FMA 1, FMA 4, dot 16) x 3 dtypes = 27; split-K reduce: 2
    partial types x 3 out dtypes = 6; activation quantization: 3 dtypes x int8 / fp8 x smooth or
    not = 12; W8A8 GEMM: int8 sym / asym + fp8 x 2 buckets x 3 out dtypes = 18; W8A8 GEMV: 2 x 3
    buckets = 6 (no float operand). 87 per capability. The dot kernels must show tensor-core
    instructions: HMMA / HGMMA for float dots, IMMA / IGMMA for int8, QGMMA for the sm_90 fp8 dot.
    """
    out = []
    for cc in capabilities:
        for dt in SUPPORTED_DTYPES:
            p = "*" + _TL[dt]
            prec = dot_precision(dt, False)
            for fmt in (FMT_INT8, FMT_INT4, FMT_FP8):
                fname = FMT_NAMES[fmt]
                for m in (32, 256):
                    cfg = select_config("wo_gemm", m, 4096, 4096, dt, cc, 128, fmt)
                    out.append(
                        _target(
                            "_wo_gemm_kernel",
                            WO_GEMM_ARGS,
                            {"X": p, "Wq": "*u8", "S": "*fp32", "Zp": "*u8", "Bias": "*fp32", "Out": p},
                            dict(stride_xk=1, W_FMT=fmt, UPCAST=False, PRECISION=prec),
                            cfg,
                            cc,
                            _TL[dt],
                            f"{fname} {m_bucket(m)}",
                            tc=TC_FLOAT,
                        )
                    )
                for m in (1, 3, 8):
                    cfg = select_config("wo_gemv", m, 4096, 4096, dt, cc)
                    use_dot = cfg["BLOCK_M"] >= 16
                    out.append(
                        _target(
                            "_wo_gemv_kernel",
                            WO_GEMV_ARGS,
                            {"X": p, "Wq": "*u8", "S": "*fp32", "Zp": "*u8", "Part": "*fp32"},
                            dict(stride_xk=1, W_FMT=fmt, USE_DOT=use_dot, UPCAST=False, PRECISION=prec),
                            cfg,
                            cc,
                            _TL[dt],
                            f"{fname} gemv {m_bucket(m)}",
                            tc=TC_FLOAT if use_dot else (),
                        )
                    )
            for acc in ("i32", "fp32"):
                cfg = select_config("reduce", 1, 4096, 0, dt, cc)
                out.append(
                    _target(
                        "_splitk_reduce_kernel",
                        REDUCE_ARGS,
                        {"Part": "*" + acc, "Out": p, "Sx": "*fp32", "Sw": "*fp32", "Bias": "*fp32"},
                        {},
                        cfg,
                        cc,
                        _TL[dt],
                        f"reduce {acc}",
                    )
                )
            for fp8 in (False, True):
                for smooth in (False, True):
                    cfg = select_config("act_quant", 1, 0, 4096, dt, cc)
                    out.append(
                        _target(
                            "_act_quant_kernel",
                            ACT_ARGS,
                            {"X": p, "Smooth": "*fp32", "Xq": "*u8" if fp8 else "*i8", "Sx": "*fp32", "RowSum": "*i32"},
                            dict(stride_xk=1, FP8=fp8, HAS_SMOOTH=smooth),
                            cfg,
                            cc,
                            _TL[dt],
                            f"act-quant {'fp8' if fp8 else 'int8'}{' smooth' if smooth else ''}",
                        )
                    )
            for fmt, asym in ((FMT_INT8, False), (FMT_INT8, True), (FMT_FP8, False)):
                fp8 = fmt == FMT_FP8
                fp8_dot = fp8 and cc >= 89
                if fp8_dot:
                    xt = wt = "*fp8e4nv"
                elif fp8:
                    xt = wt = "*u8"
                else:
                    xt, wt = "*i8", ("*u8" if asym else "*i8")
                tc = (TC_FP8_SM90 if cc >= 90 else TC_FLOAT) if fp8_dot else (TC_FLOAT if fp8 else TC_INT8)
                for m in (32, 256):
                    cfg = select_config("w8a8_gemm", m, 4096, 4096, dt, cc, 0, fmt)
                    out.append(
                        _target(
                            "_w8a8_gemm_kernel",
                            W8A8_GEMM_ARGS,
                            {
                                "Xq": xt,
                                "Wq": wt,
                                "Sx": "*fp32",
                                "Sw": "*fp32",
                                "Zp": "*u8",
                                "RowSum": "*i32",
                                "Bias": "*fp32",
                                "Out": p,
                            },
                            dict(FP8=fp8, ASYM=asym, FP8_DOT=fp8_dot, UPCAST=False),
                            cfg,
                            cc,
                            _TL[dt],
                            f"w8a8 {FMT_NAMES[fmt]}{' asym' if asym else ''} {m_bucket(m)}",
                            tc=tc,
                        )
                    )
        # the W8A8 GEMV never sees the float dtype (quantized x in, fp32 / int32 partials out)
        for fp8 in (False, True):
            for m in (1, 3, 8):
                cfg = select_config("w8a8_gemv", m, 4096, 4096, torch.float32, cc)
                use_dot = cfg["BLOCK_M"] >= 16
                out.append(
                    _target(
                        "_w8a8_gemv_kernel",
                        W8A8_GEMV_ARGS,
                        {
                            "Xq": "*u8" if fp8 else "*i8",
                            "Wq": "*u8",
                            "Zp": "*u8",
                            "RowSum": "*i32",
                            "Part": "*fp32" if fp8 else "*i32",
                        },
                        dict(FP8=fp8, USE_DOT=use_dot, UPCAST=False),
                        cfg,
                        cc,
                        "fp8" if fp8 else "i8",
                        f"w8a8 gemv {m_bucket(m)}",
                        tc=((TC_FLOAT if fp8 else TC_INT8) if use_dot else ()),
                    )
                )
    return out
