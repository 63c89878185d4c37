"""The op under torch.compile / torch.export, and its autograd (backward via the reference)."""

import pytest
import torch

import mmkernels
from oracle import max_err


class ScoredBlock(torch.nn.Module):
    def forward(self, q, k, v, bias):
        res = mmkernels.attention(q, k, v, key_bias=bias, scores="cls", return_lse=True)
        return res.out * 2, res.lse, res.scores


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    q, k, v = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 11, 32), torch.randn(2, 2, 11, 32)
    bias = torch.randn(2, 11)
    model = ScoredBlock()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, bias), model(q, k, v, bias)):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_inductor_varlen():
    torch._dynamo.reset()

    def f(q, k, v, cu):
        return (
            mmkernels.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7, causal=True)
            + 1
        )

    q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v, cu), f(q, k, v, cu))


def test_export():
    q, k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)
    exported = torch.export.export(ScoredBlock(), (q, k, v, torch.randn(1, 6)))
    assert "mmkernels.attention" in str(exported.graph)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_float64_autograd(causal):
    q = torch.randn(2, 4, 7, 32, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 9, 32, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda q, k, v, b: mmkernels.attention(q, k, v, key_bias=b, causal=causal), (q, k, v, bias), fast_mode=True
    )


def test_lse_gradient():
    """lse is float32 by contract, so its gradient is compared with autograd of the reference."""
    q, k, v = (torch.randn(1, 2, 6, 32, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(1, 2, 6, dtype=torch.float64)
    (mmkernels.attention(q, k, v, causal=True, return_lse=True).lse.double() * w).sum().backward()
    got = [t.grad.clone() for t in (q, k)]
    assert v.grad is None or torch.all(v.grad == 0)  # lse does not depend on v
    for t in (q, k):
        t.grad = None
    (mmkernels.reference_attention(q, k, v, causal=True)[1] * w).sum().backward()
    for g, t in zip(got, (q, k)):
        assert max_err(g, t.grad) < 1e-6  # grad_lse arrives in float32


def test_backward_through_fast_backend_float32():
    q, k, v = (torch.randn(2, 3, 17, 64, requires_grad=True) for _ in range(3))
    out = mmkernels.attention(q, k, v, causal=True)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = mmkernels.reference_attention(q64, k64, v64, causal=True)[0]
    ref.square().sum().backward()
    for g, t in zip(grads, (q64, k64, v64)):
        assert max_err(g, t.grad) < 1e-4
