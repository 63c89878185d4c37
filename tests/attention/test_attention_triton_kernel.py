"""Smoke tests of the Triton attention kernels, called directly through the backend contract
(docs/attention_kernel_contract.md), against an inline float64 reference.

Without a GPU they run on CPU tensors in Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before
triton is first imported: tests/conftest.py sets it (that is what makes it work in a full test run), and
this module sets it again at its top for a run of this file alone (with ``-p no:conftest`` style setups);
if triton was already imported in compiled mode, the launcher raises a RuntimeError saying so.

Tolerances: float32 -> |err| <= 2 * |err of the same math in float32 PyTorch| + 1e-5 (FlashAttention's rule).
float16 / bfloat16 inputs are upcast to float32 for the dots in the interpreter and the output is rounded
once to the input dtype (the interpreter truncates fp32 -> bf16), so |err| <= ulp(dtype) * |ref| + 1e-3.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from mmkernels.attention import triton as T  # noqa: E402

DEVICE = "cpu"  # the interpreter runs on CPU tensors; see test_gpu_runtime for CUDA
NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# float64 reference (written here, independent of mmkernels.attention.reference)
# ----------------------------------------------------------------------------------------------
def reference(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode, dtype=torch.float64):
    """Contract semantics, computed in ``dtype``: returns (out (B',Hq,Sq,Dv), lse (B',Hq,Sq), scores)."""
    q4, k4, v4 = q4.to(dtype), k4.to(dtype), v4.to(dtype)
    bias3 = None if bias3 is None else bias3.to(dtype)
    Bq, Hq, Sq, D = q4.shape
    Hkv, Sk, Dv = k4.shape[1], k4.shape[2], v4.shape[3]
    group = Hq // Hkv
    out = torch.zeros(Bq, Hq, Sq, Dv, dtype=dtype)
    lse = torch.full((Bq, Hq, Sq), -math.inf, dtype=dtype)
    scores = torch.zeros(Bq, Sk, dtype=dtype)
    if cu_q is None:
        seqs = [(b, 0, Sq, 0, Sk) for b in range(Bq)]
    else:
        seqs = [(0, int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])) for b in range(len(cu_q) - 1)]
    for tb, q0, q1, k0, k1 in seqs:
        lq, lk = q1 - q0, k1 - k0
        q = q4[tb, :, q0:q1]
        k = k4[tb, :, k0:k1].repeat_interleave(group, dim=0)
        v = v4[tb, :, k0:k1].repeat_interleave(group, dim=0)
        s = scale * (q @ k.transpose(-1, -2))  # (Hq, lq, lk)
        if bias3 is not None:
            s = s + bias3[tb, :, k0:k1][:, None, :]
        if causal:
            i = torch.arange(lq)[:, None]
            j = torch.arange(lk)[None, :]
            s = s.masked_fill(j > i + lk - lq, -math.inf)
        row_lse = torch.logsumexp(s, dim=-1) if lk > 0 else torch.full((Hq, lq), -math.inf, dtype=dtype)
        dead = torch.isneginf(row_lse)
        p = torch.exp(s - row_lse.masked_fill(dead, 0)[..., None]).masked_fill(dead[..., None], 0)
        out[tb, :, q0:q1] = p @ v
        lse[tb, :, q0:q1] = row_lse
        if lq > 0 and mode:
            rows = {1: p[:, :1], 2: p[:, -1:], 3: p}[mode]
            scores[tb, k0:k1] = rows.mean(dim=1).mean(dim=0)
    return out, lse, scores


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def make_qkv(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, seed=0, layout="bshd"):
    """q4/k4/v4 as the canonical (B, H, S, D) views of public (B, S, H, D) tensors (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        q = torch.randn(B, Lq, Hq, D, generator=g).to(dtype).permute(0, 2, 1, 3)
        k = torch.randn(B, Lk, Hkv, D, generator=g).to(dtype).permute(0, 2, 1, 3)
        v = torch.randn(B, Lk, Hkv, Dv, generator=g).to(dtype).permute(0, 2, 1, 3)
    elif layout == "sliced":  # padded last dim: row strides != D, head dim a slice of a wider tensor
        q = torch.randn(B, Hq, Lq, D + 8, generator=g).to(dtype)[..., 3 : D + 3]
        k = torch.randn(B, Hkv, Lk + 2, D, generator=g).to(dtype)[:, :, 1 : Lk + 1]
        v = torch.randn(Dv, B, Hkv, Lk, generator=g).to(dtype).permute(1, 2, 3, 0)  # last stride != 1
    else:
        q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
        k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, Lk, Dv, generator=g).to(dtype)
    return q, k, v


def poisoned_outputs(Bp, Hq, Sq, Dv, Sk, dtype, want_lse, want_scores, noncontig=True):
    if noncontig:  # (B, S, H, Dv) storage viewed as (B, H, S, Dv), like the public layout
        out = torch.full((Bp, Sq, Hq, Dv), NAN, dtype=dtype).permute(0, 2, 1, 3)
    else:
        out = torch.full((Bp, Hq, Sq, Dv), NAN, dtype=dtype)
    lse = torch.full((Bp, Sq, Hq), NAN).permute(0, 2, 1) if want_lse else None
    scores = torch.full((Bp, Sk), NAN) if want_scores else None
    return out, lse, scores


def run(
    q4,
    k4,
    v4,
    bias3=None,
    cu_q=None,
    cu_k=None,
    causal=False,
    mode=0,
    lse=True,
    config=None,
    scale=None,
    noncontig_out=True,
):
    Bq, Hq, Sq, D = q4.shape
    Sk, Dv = k4.shape[2], v4.shape[3]
    scale = D**-0.5 if scale is None else scale
    if cu_q is None:
        mq, mk = Sq, Sk
    else:
        mq = int((cu_q[1:] - cu_q[:-1]).max()) if len(cu_q) > 1 else 0
        mk = int((cu_k[1:] - cu_k[:-1]).max()) if len(cu_k) > 1 else 0
    out, lse3, scores = poisoned_outputs(Bq, Hq, Sq, Dv, Sk, q4.dtype, lse, mode != 0, noncontig_out)
    T.attention_forward(q4, k4, v4, bias3, cu_q, cu_k, mq, mk, causal, scale, mode, out, lse3, scores, config=config)
    return out, lse3, scores, scale


def check(q4, k4, v4, bias3=None, cu_q=None, cu_k=None, causal=False, mode=3, config=None, noncontig_out=True):
    out, lse, scores, scale = run(
        q4, k4, v4, bias3, cu_q, cu_k, causal, mode, True, config, noncontig_out=noncontig_out
    )
    ref = reference(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode)
    got = (out, lse, scores)
    names = ("out", "lse", "scores")
    if q4.dtype == torch.float32:
        ref32 = reference(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode, dtype=torch.float32)
    for i, name in enumerate(names):
        if got[i] is None:
            continue
        g, r = got[i].double(), ref[i]
        assert not torch.isnan(g).any(), f"{name}: NaN (unwritten or masked-row NaN)"
        finite = torch.isfinite(r)
        assert torch.equal(torch.isneginf(g), torch.isneginf(r)), f"{name}: -inf pattern differs"
        err = (g - r)[finite].abs()
        if q4.dtype == torch.float32:
            bound = 2 * (ref32[i].double() - r)[finite].abs() + 1e-5
        else:
            ulp = 2.0**-7 if q4.dtype == torch.bfloat16 else 2.0**-10
            bound = (ulp * r[finite].abs() + 1e-3) if name == "out" else torch.full_like(err, 1e-4)
        worst = (err - bound).max().item() if err.numel() else -1
        assert worst <= 0, f"{name}: max err {err.max().item():.3g} exceeds bound by {worst:.3g}"
    return out, lse, scores


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [32, 40, 64, 72, 96, 128])
@pytest.mark.parametrize("L", [1, 7, 197])
def test_dense_fp32_head_dims_and_lengths(D, L):
    B, H = (1, 2) if L == 197 else (2, 2)
    q, k, v = make_qkv(B, H, H, L, L, D, D, torch.float32, seed=D + L)
    check(q, k, v, mode=3)


@pytest.mark.parametrize("D,Dv", [(64, 32), (40, 96), (8, 16), (256, 8)])
def test_dv_differs_from_d(D, Dv):
    q, k, v = make_qkv(2, 2, 2, 19, 23, D, Dv, torch.float32, seed=D * Dv)
    check(q, k, v, causal=True, mode=1)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(Hkv):
    q, k, v = make_qkv(2, 4, Hkv, 33, 41, 32, 32, torch.float32, seed=Hkv)
    check(q, k, v, causal=True, mode=3)


@pytest.mark.parametrize("Lq,Lk", [(7, 197), (197, 7), (50, 33), (33, 50), (1, 40), (40, 1)])
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_cross_causal_bottom_right(Lq, Lk, mode):
    q, k, v = make_qkv(1, 2, 2, Lq, Lk, 32, 32, torch.float32, seed=Lq * 1000 + Lk)
    out, lse, _ = check(q, k, v, causal=True, mode=mode)
    if Lq > Lk:  # query i sees keys j <= i + Lk - Lq: the first Lq - Lk rows see nothing
        dead = Lq - Lk
        assert torch.all(out[:, :, :dead] == 0) and torch.all(torch.isneginf(lse[:, :, :dead]))


@pytest.mark.parametrize("causal", [False, True])
def test_small_blocks_multi_tile_diagonal(causal):
    """16x16 tiles: many unmasked tiles, several diagonal tiles, ragged last tile (Lq != Lk)."""
    q, k, v = make_qkv(1, 2, 1, 45, 70, 16, 24, torch.float32, seed=5)
    check(q, k, v, causal=causal, mode=3, config=dict(BLOCK_M=16, BLOCK_N=16, SCORES_BLOCK_M=16))
    q, k, v = make_qkv(1, 2, 1, 70, 45, 16, 24, torch.float32, seed=6)
    check(q, k, v, causal=causal, mode=2, config=dict(BLOCK_M=16, BLOCK_N=32, SCORES_BLOCK_M=16))


def _varlen(lens_q, lens_k, Hq, Hkv, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = torch.randn(Tq, Hq, D, generator=g).to(dtype).permute(1, 0, 2)[None]
    k = torch.randn(Tk, Hkv, D, generator=g).to(dtype).permute(1, 0, 2)[None]
    v = torch.randn(Tk, Hkv, Dv, generator=g).to(dtype).permute(1, 0, 2)[None]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_varlen_with_empty_and_single(causal, mode):
    lens_q = [0, 1, 7, 40, 5, 3]
    lens_k = [4, 1, 7, 35, 0, 9]  # (0, 4): keys but no query -> scores 0; (5, 0): rows fully masked
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, 4, 2, 40, 24, seed=mode)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(1, 4, sum(lens_k), generator=g)
    bias[0, 1, 10:14] = -math.inf
    out, lse, scores = check(
        q, k, v, bias, cu_q, cu_k, causal=causal, mode=mode, config=dict(BLOCK_M=16, BLOCK_N=16, SCORES_BLOCK_M=16)
    )
    assert torch.all(scores[0, :4] == 0)  # sequence 0 has no query


def test_bias_per_key_and_per_head_with_neg_inf():
    B, H, L = 2, 3, 37
    q, k, v = make_qkv(B, H, H, L, L, 32, 32, torch.float32, seed=11)
    g = torch.Generator().manual_seed(2)
    # per key: (B, 1, L) expanded to (B, H, L) with head stride 0
    per_key = torch.randn(B, 1, L, generator=g)
    per_key[0, 0, ::3] = -math.inf
    check(q, k, v, per_key.expand(B, H, L), mode=3)
    # per head, with one head of batch 1 fully -inf (every row of that head fully masked)
    per_head = torch.randn(B, H, L, generator=g)
    per_head[1, 2, :] = -math.inf
    per_head[0, 0, 5:9] = -math.inf
    out, lse, _ = check(q, k, v, per_head, causal=True, mode=1)
    assert torch.all(out[1, 2] == 0) and torch.all(torch.isneginf(lse[1, 2]))


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_scores_modes_and_no_lse(mode):
    q, k, v = make_qkv(2, 2, 2, 29, 29, 32, 32, torch.float32, seed=mode)
    check(q, k, v, causal=True, mode=mode)
    # scores without lse3: the launcher computes a temporary lse
    out, lse, scores, scale = run(q, k, v, causal=True, mode=mode, lse=False)
    ref = reference(q, k, v, None, None, None, True, scale, mode)
    assert lse is None
    torch.testing.assert_close(out.double(), ref[0], atol=1e-5, rtol=1e-5)
    if mode:
        torch.testing.assert_close(scores.double(), ref[2], atol=1e-6, rtol=1e-5)


def test_non_contiguous_inputs_and_outputs():
    q, k, v = make_qkv(2, 2, 1, 21, 26, 40, 24, torch.float32, seed=3, layout="sliced")
    assert not q.is_contiguous() and v.stride(-1) != 1
    check(q, k, v, causal=True, mode=3, noncontig_out=True)
    check(q.contiguous(), k.contiguous(), v.contiguous(), mode=2, noncontig_out=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_upcast_path(dtype):
    q, k, v = make_qkv(1, 2, 1, 45, 60, 64, 64, dtype, seed=7)
    check(q, k, v, causal=True, mode=3)
    q, k, v, cu_q, cu_k = _varlen([3, 20], [5, 18], 2, 2, 32, 32, dtype=dtype)
    check(q, k, v, None, cu_q, cu_k, mode=2)


def test_config_selection_and_targets():
    for bd in T.BLOCK_DS:
        for dtype in T.SUPPORTED_DTYPES:
            for cc in (80, 90, (8, 0), (9, 0), None):
                cfg = T.select_config(bd, dtype, cc, causal=True)
                assert set(cfg) >= {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
                assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16
    targets = T.compile_targets()
    assert {t.capability for t in targets} == {80, 90}
    assert {t.constexprs["BLOCK_D"] for t in targets} == set(T.BLOCK_DS)
    assert {t.dtype for t in targets} == {"fp16", "bf16", "fp32"}
    assert len(targets) < 200  # the gate must stay within its time budget
    assert T.block_d(8) == 16 and T.block_d(72) == 128 and T.block_d(256) == 256
    assert T.is_available() == (True, "")
    assert T.supports(torch.float32, 256, 256, "cpu")[0]
    assert T.supports(torch.float16, 64, 12, "cpu") == (False, "Dv=12 must be a multiple of 8 in [8, 256]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_runtime(dtype, causal):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: kernels are interpreted, not compiled")
    q, k, v = make_qkv(2, 8, 2, 300, 257, 64, 64, dtype, seed=1)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    bias = torch.randn(2, 1, 257).expand(2, 8, 257).contiguous().cuda()
    bias[:, 0, :7] = -math.inf
    Dv = v.shape[3]
    out = torch.full((2, 300, 8, Dv), NAN, dtype=dtype, device="cuda").permute(0, 2, 1, 3)
    lse = torch.full((2, 8, 300), NAN, device="cuda")
    scores = torch.full((2, 257), NAN, device="cuda")
    T.attention_forward(q, k, v, bias, None, None, 300, 257, causal, 0.125, 3, out, lse, scores)
    torch.cuda.synchronize()
    ref = reference(q.cpu(), k.cpu(), v.cpu(), bias.cpu(), None, None, causal, 0.125, 3)
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(scores.cpu().double(), ref[2], atol=1e-4, rtol=1e-3)
