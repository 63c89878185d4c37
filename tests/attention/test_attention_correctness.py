"""Every attention backend against the float64 oracle (tests/oracle.py), with the 2x rule."""

import math

import pytest
import torch

from oracle import assert_matches_oracle


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def dense_inputs(b, hq, hkv, lq, lk, d, dv=None, dtype=torch.float32, device="cpu", contiguous=False):
    """q/k/v in the (B, H, L, D) convention; by default as transposed views of (B, L, H, D)
    tensors, which is how projections produce them (non-contiguous)."""
    dv = dv or d
    if contiguous:
        return (
            rand(b, hq, lq, d, dtype=dtype, device=device),
            rand(b, hkv, lk, d, dtype=dtype, device=device),
            rand(b, hkv, lk, dv, dtype=dtype, device=device),
        )
    return (
        rand(b, lq, hq, d, dtype=dtype, device=device).transpose(1, 2),
        rand(b, lk, hkv, d, dtype=dtype, device=device).transpose(1, 2),
        rand(b, lk, hkv, dv, dtype=dtype, device=device).transpose(1, 2),
    )


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D)
    (2, 2, 2, 1, 1, 64),
    (3, 4, 2, 7, 7, 40),
    (1, 6, 2, 197, 197, 72),
    (2, 3, 1, 33, 257, 80),
    (1, 2, 2, 257, 31, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_float32(backend, shape, causal):
    name, device = backend
    b, hq, hkv, lq, lk, d = shape
    q, k, v = dense_inputs(b, hq, hkv, lq, lk, d, device=device)
    assert_matches_oracle(q, k, v, name, causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_half(backend, dtype, causal):
    name, device = backend
    q, k, v = dense_inputs(2, 4, 2, 77, 129, 64, dtype=dtype, device=device)
    assert_matches_oracle(q, k, v, name, causal=causal)


@pytest.mark.parametrize("d", list(range(32, 257, 8)))
def test_every_head_dim(backend, d):
    name, device = backend
    q, k, v = dense_inputs(1, 2, 1, 19, 23, d, device=device)
    assert_matches_oracle(q, k, v, name, scale=0.7 / math.sqrt(d))


@pytest.mark.parametrize("d,dv", [(64, 32), (40, 96), (128, 64)])
def test_value_head_dim_differs(backend, d, dv):
    name, device = backend
    q, k, v = dense_inputs(2, 2, 2, 17, 21, d, dv, device=device)
    assert_matches_oracle(q, k, v, name, causal=True)


@pytest.mark.parametrize("length", [1, 7, 197, 257, 577])
def test_odd_lengths(backend, length):
    name, device = backend
    if name == "triton" and device == "cpu" and length > 257:
        pytest.skip("the Triton interpreter is too slow for L=577; covered on GPU")
    q, k, v = dense_inputs(1, 2, 2, length, length, 64, device=device)
    assert_matches_oracle(q, k, v, name)


@pytest.mark.parametrize("lq,lk", [(321, 321), (40, 577), (577, 400), (1, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_long_sequences_multi_block(backend, lq, lk, dtype):
    """Past one key block (the CPU kernel keeps up to 320 keys in one block): online rescaling,
    with causal masking, a -inf key bias and scores."""
    name, device = backend
    if name == "triton" and device == "cpu" and lq * lk > 100_000:
        pytest.skip("too slow for the Triton interpreter; covered on GPU")
    q, k, v = dense_inputs(1, 2, 1, lq, lk, 64, dtype=dtype, device=device)
    bias = torch.randn(1, lk, device=device)
    bias[:, 3::11] = float("-inf")
    assert_matches_oracle(q, k, v, name, causal=True, key_bias=bias, scores="mean")


@pytest.mark.parametrize("scores", ["cls", "last", "mean"])
@pytest.mark.parametrize("per_head", [False, True], ids=["bias_BL", "bias_BHL"])
def test_key_bias_with_masked_keys(backend, scores, per_head):
    name, device = backend
    b, hq, hkv, lq, lk, d = 3, 4, 2, 21, 45, 64
    q, k, v = dense_inputs(b, hq, hkv, lq, lk, d, device=device)
    shape = (b, hq, lk) if per_head else (b, lk)
    bias = torch.randn(shape, device=device)
    bias[..., ::5] = float("-inf")  # masked keys (padding)
    bias[1] = float("-inf")  # a fully masked sequence: output 0, lse -inf, scores 0
    res = assert_matches_oracle(q, k, v, name, key_bias=bias, scores=scores)
    assert torch.all(res.out[1] == 0) and torch.all(torch.isneginf(res.lse[1]))
    assert torch.all(res.scores[1] == 0)
    assert torch.all(res.scores[0, ::5] == 0)


@pytest.mark.parametrize("lq,lk", [(5, 40), (40, 5), (64, 64)])
def test_causal_cross_bottom_right(backend, lq, lk):
    """Lq > Lk leaves the first Lq - Lk rows fully masked: output 0, lse -inf."""
    name, device = backend
    q, k, v = dense_inputs(2, 2, 1, lq, lk, 32, device=device)
    res = assert_matches_oracle(q, k, v, name, causal=True, scores="last")
    if lq > lk:
        assert torch.all(res.out[:, :, : lq - lk] == 0)
        assert torch.all(torch.isneginf(res.lse[:, :, : lq - lk]))


@pytest.mark.parametrize("scores", ["cls", "last", "mean"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_uneven(backend, scores, causal):
    name, device = backend
    lens_q = [5, 0, 1, 97, 12]
    lens_k = [9, 3, 1, 97, 0]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    hq, hkv, d = 4, 2, 72
    q = rand(sum(lens_q), hq, d, device=device)
    k = rand(sum(lens_k), hkv, d, device=device)
    v = rand(sum(lens_k), hkv, d, device=device)
    bias = torch.randn(sum(lens_k), device=device)
    bias[::7] = float("-inf")
    res = assert_matches_oracle(
        q,
        k,
        v,
        name,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
        key_bias=bias,
        causal=causal,
        scores=scores,
    )
    assert res.out.shape == (sum(lens_q), hq, d) and res.lse.shape == (sum(lens_q), hq)
    assert res.scores.shape == (sum(lens_k),)
    # The last sequence has no keys: its rows are fully masked.
    assert torch.all(res.out[-12:] == 0) and torch.all(torch.isneginf(res.lse[-12:]))


def test_varlen_per_head_bias_and_derived_max_seqlen(backend):
    name, device = backend
    lens = [3, 64, 1]
    cu = torch.tensor([0, 3, 67, 68], dtype=torch.int32, device=device)
    q, k, v = (rand(68, 2, 48, device=device) for _ in range(3))
    bias = torch.randn(68, 2, device=device)
    assert max(lens) == 64
    assert_matches_oracle(q, k, v, name, cu_seqlens_q=cu, cu_seqlens_k=cu, key_bias=bias)


def test_non_contiguous_strided_views(backend):
    """Every-other-token slices and a batch-strided view: no stride assumption but the last dim."""
    name, device = backend
    big = rand(2, 4, 50, 3, 64, device=device)
    q, k, v = big[:, :, ::2, 0], big[:, :, 1::2, 1], big[:, :, :25, 2]
    assert not q.is_contiguous()
    assert_matches_oracle(q, k, v, name, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_scores_and_lse(backend, dtype):
    name, device = backend
    q, k, v = dense_inputs(2, 6, 3, 65, 197, 64, dtype=dtype, device=device)
    bias = torch.randn(2, 197, device=device)
    assert_matches_oracle(q, k, v, name, key_bias=bias, scores="cls")


def test_cpu_serves_float16_varlen_gqa():
    """float16 on the cpu backend: widened to fp32 by the kernel, packed sequences and GQA too."""
    if not _cpu_available():
        pytest.skip("the cpu backend is not built")
    cu = torch.tensor([0, 5, 68, 69, 166], dtype=torch.int32)
    q = rand(166, 6, 40, dtype=torch.float16)
    k, v = rand(166, 2, 40, dtype=torch.float16), rand(166, 2, 40, dtype=torch.float16)
    res = assert_matches_oracle(q, k, v, "cpu", cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, scores="last")
    assert res.out.dtype == torch.float16


def _cpu_available():
    from mmkernels import _dispatch

    cpu = {b.name: b for b in _dispatch.backends_for("attention")}.get("cpu")
    return cpu is not None and cpu.availability()[0]
