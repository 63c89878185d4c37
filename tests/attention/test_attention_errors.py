"""Bad input gets a clear error that names the argument (never a wrong answer or a crash)."""

import pytest
import torch

import mmkernels
from mmkernels import NoBackendError


def qkv(b=2, hq=4, hkv=2, lq=5, lk=6, d=32):
    return torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)


def packed(tq=10, tk=12, hq=4, hkv=2, d=32):
    return torch.randn(tq, hq, d), torch.randn(tk, hkv, d), torch.randn(tk, hkv, d)


def cu(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "bad, kind, pattern",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D"),
        (lambda q, k, v: (q, k[..., :16], v), ValueError, r"same head dim"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"same batch size"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, r"multiple of the number of key/value heads"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"v must match k"),
        (lambda q, k, v: (q, k.double(), v), TypeError, r"share one dtype"),
        (lambda q, k, v: (q, k, v.to(torch.int32)), TypeError, r"v must be a floating tensor"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, r"q must be a torch.Tensor"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, r"one device"),
    ],
)
def test_bad_tensors(bad, kind, pattern):
    with pytest.raises(kind, match=pattern):
        mmkernels.attention(*bad(*qkv()))


def test_bad_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scores must be one of"):
        mmkernels.attention(q, k, v, scores="max")
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        mmkernels.attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match=r"scale must be a finite float"):
        mmkernels.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match=r"unknown backend 'flash'"):
        mmkernels.attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match=r"only used with cu_seqlens"):
        mmkernels.attention(q, k, v, max_seqlen_q=5)


@pytest.mark.parametrize("shape", [(2, 5), (3, 6), (2, 3, 6), (2, 4, 6, 1), (6,)])
def test_bad_key_bias_shape(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"key_bias must have shape"):
        mmkernels.attention(q, k, v, key_bias=torch.randn(shape))


def test_bad_key_bias_dtype_device():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"key_bias must be a floating tensor"):
        mmkernels.attention(q, k, v, key_bias=torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_bias is on meta"):
        mmkernels.attention(q, k, v, key_bias=torch.ones(2, 6, device="meta"))


@pytest.mark.parametrize(
    "cu_q, cu_k, kind, pattern",
    [
        (cu(0, 4, 10).long(), cu(0, 6, 12), TypeError, r"cu_seqlens_q must be int32"),
        (cu(0, 6, 4, 10), cu(0, 4, 8, 12), ValueError, r"cu_seqlens_q must be non-decreasing"),
        (cu(0, 4, 9), cu(0, 6, 12), ValueError, r"cu_seqlens_q\[-1\] must equal .* \(10\)"),
        (cu(0, 4, 10), cu(0, 6, 11), ValueError, r"cu_seqlens_k\[-1\] must equal .* \(12\)"),
        (cu(0, 4, 10), cu(0, 2, 6, 12), ValueError, r"same length"),
        (cu(1, 4, 10), cu(0, 6, 12), ValueError, r"cu_seqlens_q must start at 0"),
        (cu(0, 4, 10)[None], cu(0, 6, 12), ValueError, r"cu_seqlens_q must be 1-D"),
        (cu(0, 4, 10), None, ValueError, r"must be given together"),
    ],
)
def test_bad_cu_seqlens(cu_q, cu_k, kind, pattern):
    q, k, v = packed()
    with pytest.raises(kind, match=pattern):
        mmkernels.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_bad_varlen_layout_and_max_seqlen():
    q, k, v = packed()
    with pytest.raises(ValueError, match=r"q must be 3-D in the \(T, H, D\) packed layout"):
        mmkernels.attention(q[None], k, v, cu_seqlens_q=cu(0, 10), cu_seqlens_k=cu(0, 12))
    with pytest.raises(ValueError, match=r"max_seqlen_k=5 is smaller than the longest"):
        mmkernels.attention(q, k, v, cu_seqlens_q=cu(0, 10), cu_seqlens_k=cu(0, 12), max_seqlen_k=5)
    with pytest.raises(TypeError, match=r"max_seqlen_q must be a non-negative Python int"):
        mmkernels.attention(q, k, v, cu_seqlens_q=cu(0, 10), cu_seqlens_k=cu(0, 12), max_seqlen_q=torch.tensor(10))
    with pytest.raises(ValueError, match=r"key_bias must have shape \(12,\) or \(12, 4\)"):
        mmkernels.attention(q, k, v, cu_seqlens_q=cu(0, 10), cu_seqlens_k=cu(0, 12), key_bias=torch.randn(10))


def test_backend_that_cannot_serve_lists_every_backend():
    q, k, v = qkv(d=36)  # not a multiple of 8: only the reference can run it
    with pytest.raises(NoBackendError) as info:
        mmkernels.attention(q, k, v, backend="cpu")
    message = str(info.value)
    assert "head dim D=36 is not a multiple of 8" in message
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"- {name}:" in message


def test_unknown_backend_from_environment(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("MMKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"MMKERNELS_BACKEND: unknown backend 'nope'"):
        mmkernels.attention(q, k, v)
