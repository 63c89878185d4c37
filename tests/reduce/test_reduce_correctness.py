"""Token-reduction primitives against an independent, straightforward implementation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmkernels
from mmkernels.reduce import mergeable_a_tokens


def naive_plan(metric, r, protect_first):
    """Dense similarity + argsort, one row at a time, in float64 Python loops."""
    metric = metric.double()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    pairs = []
    for row in metric:
        n = row.shape[0]
        a = [i for i in range(protect_first, n) if i % 2 == 0]
        b = [j for j in range(protect_first, n) if j % 2 == 1]
        best = []
        for i in a:
            sims = [float(row[i] @ row[j]) for j in b]
            jbest = max(range(len(b)), key=lambda t: (sims[t], -t))  # first max
            best.append((sims[jbest], i, b[jbest]))
        best.sort(key=lambda t: (-t[0], t[1]))  # ties -> lower A position
        pairs.append(sorted((i, j) for _, i, j in best[:r]))
    return pairs


def naive_merge(x, size, pairs_row):
    """Group every token with its destination; size-weighted mean; survivors in original order."""
    n = x.shape[0]
    dst = {i: j for i, j in pairs_row}
    out, out_size = [], []
    for t in range(n):
        if t in dst:
            continue
        group = [t] + [i for i, j in pairs_row if j == t]
        w = size[group].double()
        out.append((x[group].double() * w[:, None]).sum(0) / w.sum())
        out_size.append(w.sum())
    return torch.stack(out), torch.stack(out_size)


def random_metric(b, n, c, dtype=torch.float32, strided=False):
    if strided:
        return torch.randn(b, c, n).to(dtype).transpose(1, 2)
    return torch.randn(b, n, c).to(dtype)


@pytest.mark.parametrize("n", [2, 7, 50, 197])
@pytest.mark.parametrize("protect_first", [0, 1, 2])
@pytest.mark.parametrize("r_kind", ["zero", "one", "max"])
def test_plan_matches_naive(backend, n, protect_first, r_kind):
    limit = mergeable_a_tokens(n, protect_first)
    r = {"zero": 0, "one": min(1, limit), "max": limit}[r_kind]
    metric = random_metric(3, n, 16, strided=True)
    plan = mmkernels.tome_plan(metric, r, protect_first=protect_first, backend=backend.name)
    want = naive_plan(metric, r, protect_first)
    for b in range(3):
        got = sorted(zip(plan.src_idx[b].tolist(), plan.dst_idx[b].tolist()))
        assert got == want[b]
        merged = {i for i, _ in want[b]}
        assert plan.keep_idx[b].tolist() == [t for t in range(n) if t not in merged]


@pytest.mark.parametrize("batch", [1, 4, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_match_naive(backend, batch, dtype):
    n, c = 37, 24
    metric = random_metric(batch, n, 8)
    plan = mmkernels.tome_plan(metric, 9, protect_first=1, backend=backend.name)
    x = torch.randn(batch, c, n).to(dtype).transpose(1, 2)  # non-contiguous
    size = torch.rand(batch, n) + 0.5
    x_out, size_out = mmkernels.tome_merge(x, plan, size, backend=backend.name)
    assert x_out.dtype == dtype and x_out.shape == (batch, n - 9, c)
    pairs = naive_plan(metric, 9, 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for b in range(batch):
        want_x, want_size = naive_merge(x[b], size[b], pairs[b])
        torch.testing.assert_close(x_out[b].double(), want_x, atol=tol, rtol=tol)
        torch.testing.assert_close(size_out[b].double(), want_size, atol=1e-5, rtol=1e-5)
    back = mmkernels.tome_unmerge(x_out, plan, backend=backend.name)
    assert back.shape == x.shape
    torch.testing.assert_close(back.gather(1, plan.keep_idx[..., None].expand(-1, -1, c)), x_out)
    torch.testing.assert_close(
        back.gather(1, plan.src_idx[..., None].expand(-1, -1, c)),
        back.gather(1, plan.dst_idx[..., None].expand(-1, -1, c)),
    )


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    n=st.integers(2, 80),
    c=st.integers(1, 16),
    pf=st.integers(0, 2),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_conserves_mass_and_size(b, n, c, pf, frac, seed):
    g = torch.Generator().manual_seed(seed)
    pf = min(pf, n)
    r = int(frac * mergeable_a_tokens(n, pf))
    plan = mmkernels.tome_plan(torch.randn(b, n, 8, generator=g), r, protect_first=pf)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    size = torch.rand(b, n, generator=g, dtype=torch.float64) * 3 + 0.1
    x_out, size_out = mmkernels.tome_merge(x, plan, size)
    torch.testing.assert_close((size_out[..., None] * x_out).sum(1), (size[..., None] * x).sum(1))
    torch.testing.assert_close(size_out.sum(1), size.sum(1))
    assert plan.keep_idx[:, :pf].tolist() == [list(range(pf))] * b  # protected tokens first


def naive_select(row, k, pf):
    rest = sorted(range(pf, len(row)), key=lambda t: (-float(row[t]), t))[: k - pf]
    return sorted(list(range(pf)) + rest)


@pytest.mark.parametrize("k,pf", [(1, 1), (5, 0), (5, 2), (50, 1), (98, 1)])
def test_select_and_gather(backend, k, pf):
    scores = torch.rand(5, 98)
    scores[:, 10:20] = 0.5  # ties
    idx = mmkernels.select_tokens(scores, k, protect_first=pf, backend=backend.name)
    assert idx.tolist() == [naive_select(r, k, pf) for r in scores]
    x = torch.randn(5, 64, 98).transpose(1, 2)
    sel = mmkernels.gather_tokens(x, idx, backend=backend.name)
    torch.testing.assert_close(sel, torch.stack([x[b, idx[b]] for b in range(5)]))


def test_select_varlen_packs_for_attention():
    scores = torch.rand(3, 40)
    counts = torch.tensor([5, 1, 17])
    idx, cu = mmkernels.select_tokens(scores, counts, protect_first=1)
    assert cu.tolist() == [0, 5, 6, 23] and cu.dtype == torch.int32
    for b in range(3):
        assert idx[cu[b] : cu[b + 1]].tolist() == naive_select(scores[b], int(counts[b]), 1)
    x = torch.randn(3, 40, 8)
    packed = mmkernels.gather_tokens(x, idx, cu)
    assert packed.shape == (23, 8)
    torch.testing.assert_close(packed[6:], x[2, idx[6:]])
    q = packed.reshape(23, 2, 4)
    out = mmkernels.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17, max_seqlen_k=17)
    assert out.shape == (23, 2, 4)


def test_gradients_flow_through_merge_and_gather():
    x = torch.randn(2, 11, 4, dtype=torch.float64, requires_grad=True)
    size = torch.rand(2, 11, dtype=torch.float64) + 0.5
    plan = mmkernels.tome_plan(torch.randn(2, 11, 3), 4)
    torch.autograd.gradcheck(lambda t: mmkernels.tome_merge(t, plan, size)[0], (x,))
    torch.autograd.gradcheck(lambda t: mmkernels.tome_unmerge(t, plan), (x[:, :7].detach().requires_grad_(),))
    idx = mmkernels.select_tokens(torch.rand(2, 11), 6)
    torch.autograd.gradcheck(lambda t: mmkernels.gather_tokens(t, idx), (x,))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(x, metric, size):
        plan = mmkernels.tome_plan(metric, 4)
        x_out, size_out = mmkernels.tome_merge(x, plan, size)
        idx = mmkernels.select_tokens(size_out, 3)
        return mmkernels.gather_tokens(x_out, idx), mmkernels.tome_unmerge(x_out, plan)

    args = (torch.randn(2, 13, 8), torch.randn(2, 13, 5), torch.rand(2, 13) + 1)
    for got, want in zip(torch.compile(step, fullgraph=True, backend="aot_eager")(*args), step(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_batches_and_bf16_metric(backend, batch, dtype):
    """Batch sizes 1..33 and bfloat16 metrics (similarities are computed in float32)."""
    metric = random_metric(batch, 51, 12, dtype=dtype, strided=True)
    plan = mmkernels.tome_plan(metric, 11, protect_first=2, backend=backend.name)
    want = naive_plan(metric.float(), 11, 2)
    for b in range(batch):
        assert sorted(zip(plan.src_idx[b].tolist(), plan.dst_idx[b].tolist())) == want[b]
