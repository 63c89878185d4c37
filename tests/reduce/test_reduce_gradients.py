"""Gradients of the token-reduction primitives: tome_merge / merge_tokens with respect to ``size``
(gradcheck in float64, every backend against autograd through the reference, under compile)."""

import pytest
import torch

import mmkernels
from mmkernels import _dispatch
from mmkernels.reduce import merge_tokens, reference

BACKEND_OP = "tome_merge"  # conftest's backend fixture: the backends registered for tome_merge


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 11, 4, generator=g, dtype=torch.float64).to(dtype)
    size = (torch.rand(2, 11, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    plan = mmkernels.tome_plan(torch.randn(2, 11, 3, generator=g), 4)
    return x, size, plan


def test_tome_merge_size_gradcheck_float64():
    x, size, plan = _inputs(torch.float64)
    x.requires_grad_(True)
    size.requires_grad_(True)
    torch.autograd.gradcheck(lambda t, s: mmkernels.tome_merge(t, plan, s), (x, size))
    # size alone, through size_out alone and through x_out alone
    torch.autograd.gradcheck(lambda s: mmkernels.tome_merge(x.detach(), plan, s), (size,))
    torch.autograd.gradcheck(lambda s: mmkernels.tome_merge(x.detach(), plan, s)[1], (size,))
    torch.autograd.gradcheck(lambda s: mmkernels.tome_merge(x.detach(), plan, s)[0], (size,))
    src_to_out = plan.src_to_out
    torch.autograd.gradcheck(lambda t, s: merge_tokens(t, src_to_out, plan.num_out, s), (x, size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tome_merge_size_gradient_matches_reference(backend, dtype):
    """Our backward against autograd through the plain-PyTorch reference, in float64."""
    x, size, plan = _inputs(dtype)
    try:
        _dispatch.select(
            "tome_merge",
            mmkernels.reduce.api.ReduceCall("tome_merge", "cpu", str(dtype).replace("torch.", "")),
            "cpu",
            backend.name,
        )
    except _dispatch.NoBackendError as e:
        pytest.skip(f"{backend.name} does not take {dtype}: {e}")
    gx, gs = torch.randn(2, 7, 4, dtype=dtype), torch.randn(2, 7, dtype=dtype)
    xa, sa = x.clone().requires_grad_(True), size.clone().requires_grad_(True)
    out, size_out = mmkernels.tome_merge(xa, plan, sa, backend=backend.name)
    torch.autograd.backward((out, size_out), (gx, gs))
    xr, sr = x.double().requires_grad_(True), size.double().requires_grad_(True)
    ref_out, ref_size = reference.tome_merge(xr, plan.src_to_out, plan.num_out, sr)
    torch.autograd.backward((ref_out, ref_size), (gx.double(), gs.double()))
    assert sa.grad is not None and sa.grad.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sa.grad.double(), sr.grad, **tol)
    torch.testing.assert_close(xa.grad.double(), xr.grad, **tol)


def test_tome_merge_size_gradient_under_compile():
    torch._dynamo.reset()
    x, size, plan = _inputs(torch.float64)
    f = torch.compile(lambda t, s: mmkernels.tome_merge(t, plan, s), fullgraph=True, backend="aot_eager")
    s = size.clone().requires_grad_(True)
    out, size_out = f(x, s)
    (out.sum() + (size_out**2).sum()).backward()
    sr = size.clone().requires_grad_(True)
    ref_out, ref_size = reference.tome_merge(x, plan.src_to_out, plan.num_out, sr)
    (ref_out.sum() + (ref_size**2).sum()).backward()
    torch.testing.assert_close(s.grad, sr.grad)
