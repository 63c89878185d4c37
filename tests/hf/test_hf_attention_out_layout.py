"""The attention output is written in (B, Lq, H, Dv) memory, the layout transformers' attention
interface returns: the bridge's ``out.transpose(1, 2)`` is contiguous, so the model's reshape to
(B, Lq, H * Dv) needs no copy; HF's transposed q/k/v views go to the kernel as they are."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mmkernels
from mmkernels.hf import hf_attention


def _qkv(b=2, h=3, lq=7, lk=9, d=16, dv=16):
    # transposed views of (B, L, H, D), as HF models produce them
    q = torch.randn(b, lq, h, d).transpose(1, 2)
    k = torch.randn(b, lk, h, d).transpose(1, 2)
    v = torch.randn(b, lk, h, dv).transpose(1, 2)
    return q, k, v


def test_dense_output_is_a_view_of_blhd_memory():
    q, k, v = _qkv()
    out = mmkernels.attention(q, k, v)
    assert out.shape == (2, 3, 7, 16)
    assert out.transpose(1, 2).is_contiguous()
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.allclose(out.double(), want, atol=1e-5)


def test_fake_implementation_has_the_same_strides():
    q, k, v = _qkv(dv=8)
    out = mmkernels.attention(q, k, v, scores="cls").out
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.mmkernels.attention(fq, fk, fv, None, None, None, 7, 9, False, 0.25, 1, False, "")[0]
    assert fake.shape == out.shape and fake.stride() == out.stride()


def test_varlen_output_layout_unchanged():
    q, k, v = (torch.randn(10, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = mmkernels.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert out.shape == (10, 2, 8) and out.is_contiguous()


def test_hf_bridge_returns_contiguous_blhd():
    pytest.importorskip("transformers")
    module = torch.nn.Module()
    module.is_causal = False
    hf_attention.STATES[module] = hf_attention.ModuleState()
    q, k, v = _qkv(lq=9)
    out, weights = hf_attention.attention_forward(module, q, k, v, None, scaling=0.25)
    assert weights is None and out.shape == (2, 9, 3, 16) and out.is_contiguous()
    assert hf_attention.STATES[module].served == 1
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-5)
    # the model's reshape is a view of the kernel's output
    assert out.reshape(2, 9, -1).data_ptr() == out.data_ptr()
