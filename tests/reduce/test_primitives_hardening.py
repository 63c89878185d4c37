"""Hardening of the token-reduction primitives: malformed packed cu_seqlens (eager and under
torch.compile), and the gradient of tome_merge / merge_tokens with respect to ``size``."""
import pytest
import torch

import mmkernels
from mmkernels import _dispatch
from mmkernels.reduce import merge_tokens, reference


def _merge_backends():
    out = []
    for b in _dispatch.backends_for("tome_merge"):
        ok, why = b.availability()
        marks = [] if ok else [pytest.mark.skip(reason=f"{b.name} unavailable: {why}")]
        out.append(pytest.param(b.name, id=b.name, marks=marks))
    return out


# ----------------------------------------------------------------------------------------------
# gather_tokens with packed cu_seqlens
# ----------------------------------------------------------------------------------------------

X = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
IDX = torch.tensor([0, 1, 2, 0, 4])
BAD_CU = [
    ([0, 4, 3], ValueError, r"cu_seqlens must be non-decreasing, got \[0, 4, 3\]"),
    ([1, 3, 5], ValueError, r"cu_seqlens must start at 0, got 1"),
    ([0, 3, 4], ValueError, r"cu_seqlens\[-1\] must equal len\(idx\) = 5, got 4"),
    ([0, 3, 6], ValueError, r"cu_seqlens\[-1\] must equal len\(idx\) = 5, got 6"),
]


@pytest.mark.parametrize("cu, err, message", BAD_CU + [
    ([0, 5], ValueError, r"cu_seqlens \(B\+1,\) = \(3,\), got .* cu_seqlens int64\[2\]"),
    ([0, 2, 3, 5], ValueError, r"cu_seqlens \(B\+1,\) = \(3,\), got .* cu_seqlens int64\[4\]"),
])
def test_gather_packed_refuses_malformed_cu_seqlens(cu, err, message):
    with pytest.raises(err, match=message):
        mmkernels.gather_tokens(X, IDX, torch.tensor(cu))


def test_gather_packed_refuses_non_integer_cu_seqlens():
    with pytest.raises(TypeError, match=r"cu_seqlens must be an int32/int64 tensor .* float32"):
        mmkernels.gather_tokens(X, IDX, torch.tensor([0.0, 3.0, 5.0]))
    with pytest.raises(TypeError, match=r"cu_seqlens must be an int32/int64 tensor .* list"):
        mmkernels.gather_tokens(X, IDX, [0, 3, 5])


def test_gather_packed_good_and_gradient():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    got = mmkernels.gather_tokens(X, IDX, cu)
    torch.testing.assert_close(got, torch.cat([X[0, IDX[:3]], X[1, IDX[3:]]]))
    x = X.double().requires_grad_(True)
    torch.autograd.gradcheck(lambda t: mmkernels.gather_tokens(t, IDX, cu), (x,))
    empty = mmkernels.gather_tokens(X, IDX[:0], torch.tensor([0, 0, 0]))
    assert empty.shape == (0, 4)


def test_gather_packed_compiled_checks_cu_seqlens():
    """Under torch.compile(fullgraph=True) the op reads cu_seqlens when it runs (CPU)."""
    torch._dynamo.reset()
    f = torch.compile(lambda x, i, c: mmkernels.gather_tokens(x, i, c) * 2, fullgraph=True,
                      backend="aot_eager")
    good = torch.tensor([0, 3, 5])
    torch.testing.assert_close(f(X, IDX, good), mmkernels.gather_tokens(X, IDX, good) * 2)
    for cu, _err, message in BAD_CU:
        with pytest.raises(Exception, match=message):
            f(X, IDX, torch.tensor(cu))
    with pytest.raises(Exception, match=r"idx values must be in \[0, 5\), got \[0, 7\]"):
        f(X, torch.tensor([0, 1, 2, 0, 7]), good)


# ----------------------------------------------------------------------------------------------
# tome_merge: gradient with respect to size
# ----------------------------------------------------------------------------------------------

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
    torch.autograd.gradcheck(lambda t, s: merge_tokens(t, src_to_out, plan.num_out, s),
                             (x, size))


@pytest.mark.parametrize("backend", _merge_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tome_merge_size_gradient_matches_reference(backend, dtype):
    """Our backward against autograd through the plain-PyTorch reference, in float64."""
    x, size, plan = _inputs(dtype)
    try:
        _dispatch.select("tome_merge", mmkernels.reduce.api.ReduceCall(
            "tome_merge", "cpu", str(dtype).replace("torch.", "")), "cpu", backend)
    except _dispatch.NoBackendError as e:
        pytest.skip(f"{backend} does not take {dtype}: {e}")
    gx, gs = torch.randn(2, 7, 4, dtype=dtype), torch.randn(2, 7, dtype=dtype)
    xa, sa = x.clone().requires_grad_(True), size.clone().requires_grad_(True)
    out, size_out = mmkernels.tome_merge(xa, plan, sa, backend=backend)
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
    f = torch.compile(lambda t, s: mmkernels.tome_merge(t, plan, s), fullgraph=True,
                      backend="aot_eager")
    s = size.clone().requires_grad_(True)
    out, size_out = f(x, s)
    (out.sum() + (size_out ** 2).sum()).backward()
    sr = size.clone().requires_grad_(True)
    ref_out, ref_size = reference.tome_merge(x, plan.src_to_out, plan.num_out, sr)
    (ref_out.sum() + (ref_size ** 2).sum()).backward()
    torch.testing.assert_close(s.grad, sr.grad)
