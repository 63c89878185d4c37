"""Extra checks of the Triton token-reduction backend (mmkernels/reduce/triton.py).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported); the GPU test runs them compiled on CUDA tensors.
What the shared tests (test_reduce_correctness.py) do not cover: several tiles over A, B and C, 16-bit metrics,
exact ties (duplicated / one-hot tokens, zero vectors), NaN / -0.0 / tied scores, float64 and integer
dtypes, out-of-range gather indices, and dispatch (auto-selection, reasons).
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import mmkernels  # noqa: E402
from mmkernels import _dispatch  # noqa: E402
from mmkernels.reduce import reference as R  # noqa: E402
from mmkernels.reduce import triton as T  # noqa: E402

from test_reduce_correctness import naive_plan, naive_select  # noqa: E402  (tests/reduce is on sys.path)

pytestmark = pytest.mark.skipif(
    not T.supports("gather_tokens", torch.float32, "cpu")[0] and not torch.cuda.is_available(),
    reason="Triton backend cannot run here",
)


def plan_pairs(plan):
    return [sorted(zip(s.tolist(), d.tolist())) for s, d in zip(plan.src_idx, plan.dst_idx)]


def assert_plans_equal(got, want):
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plan_many_tiles(dtype):
    """N=203, C=40: 7 A tiles x 7 B tiles x 3 C chunks per row in the interpreter's 16-wide blocks."""
    metric = torch.randn(2, 40, 203).to(dtype).transpose(1, 2)
    for pf, r in ((1, 60), (0, 101)):
        plan = mmkernels.tome_plan(metric, r, protect_first=pf, backend="triton")
        assert plan_pairs(plan) == naive_plan(metric, r, pf)  # float64 oracle on the same values
        if dtype == torch.float32:
            assert_plans_equal(plan, mmkernels.tome_plan(metric, r, protect_first=pf, backend="reference"))


def test_plan_exact_ties():
    """Duplicated B tokens -> lowest B wins; duplicated A tokens -> lowest A merges first; zero tokens."""
    metric = torch.randn(3, 61, 24)
    metric[:, 7] = metric[:, 3]
    metric[:, 41] = metric[:, 3]  # three identical B tokens
    metric[:, 10] = metric[:, 4]
    metric[:, 50] = metric[:, 4]  # three identical A tokens
    metric[:, 20] = 0.0  # zero vector: similarity 0 (norm clamped)
    metric[:, 21] = 0.0
    onehot = torch.eye(6)[torch.randint(0, 6, (2, 45))] + torch.eye(6)[torch.randint(0, 6, (2, 45))]
    for m, r in ((metric, 20), (metric, 29), (onehot, 15), (onehot, 22)):
        plan = mmkernels.tome_plan(m, r, protect_first=1, backend="triton")
        if m is onehot:  # (naive_plan divides by a zero norm: NaN, so only the reference for zeros)
            assert plan_pairs(plan) == naive_plan(m, r, 1)
        assert_plans_equal(plan, mmkernels.tome_plan(m, r, protect_first=1, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_select_ties_nan_and_dtypes(dtype):
    scores = torch.randint(0, 5, (3, 150)).to(dtype)  # heavy ties
    scores[0, 17] = float("nan")  # NaN ranks first, as in torch.sort
    scores[0, 90] = float("nan")
    scores[1, 3::7] = -0.0  # -0.0 == 0.0
    scores = scores.t().contiguous().t()  # non-contiguous rows
    for k, pf in ((1, 1), (40, 0), (75, 3), (150, 2)):
        got = mmkernels.select_tokens(scores, k, protect_first=pf, backend="triton")
        assert torch.equal(got, R.select_tokens(scores, k, pf))
        assert got[1:].tolist() == [naive_select(row.double(), k, pf) for row in scores[1:]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_merge_dtypes_against_reference(dtype):
    b, n, c = 2, 45, 70  # C spans 5 interpreter channel blocks
    plan = mmkernels.tome_plan(torch.randn(b, n, 8), 20, protect_first=2)
    x = torch.randn(b, c, n, dtype=torch.float64).to(dtype).transpose(1, 2)
    size = (torch.rand(n, b) * 3 + 0.5).to(torch.bfloat16).t()  # non-contiguous, 16-bit sizes
    got_x, got_s = mmkernels.tome_merge(x, plan, size, backend="triton")
    want_x, want_s = R.tome_merge(x, plan.src_to_out, plan.num_out, size)
    assert got_x.dtype == dtype and got_s.dtype == torch.bfloat16
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=0, rtol=0)
    torch.testing.assert_close(got_x, want_x, **tol)
    torch.testing.assert_close(got_s, want_s, atol=0, rtol=0)


def test_gather_and_unmerge_any_dtype_and_out_of_range():
    x = torch.arange(2 * 9 * 5).reshape(2, 5, 9).transpose(1, 2)  # int64, non-contiguous
    idx = torch.tensor([[8, 0, 3], [1, 1, 7]])
    for t in (x, x.to(torch.int16), x.to(torch.bool), x.to(torch.float64), x.to(torch.int8)):
        assert torch.equal(mmkernels.gather_tokens(t, idx, backend="triton"), R.gather_tokens(t, idx))
    plan = mmkernels.tome_plan(torch.randn(2, 9, 4), 3)
    pos = torch.arange(6 * 2).reshape(2, 6, 1)  # int64 positions, C=1
    assert torch.equal(mmkernels.tome_unmerge(pos, plan, backend="triton"), R.tome_unmerge(pos, plan.src_to_out))
    # api.py checks ranges on CPU; the kernel itself reads zeros for out-of-range rows (no fault)
    bad = torch.tensor([[9, -1, 2], [100, 0, 8]])
    got = T.gather_tokens(x.float(), bad)
    assert torch.equal(got[0, :2], torch.zeros(2, 5)) and torch.equal(got[1, 0], torch.zeros(5))
    assert torch.equal(got[0, 2], x[0, 2].float()) and torch.equal(got[1, 2], x[1, 8].float())


def test_dispatch():
    call = mmkernels.reduce.api.ReduceCall("tome_plan", "cuda", "float64")
    backend = {b.name: b for b in _dispatch.backends_for("tome_plan")}["triton"]
    assert any("float64" in why for why in backend.reasons(call))
    assert backend.auto_devices == ("cuda",)
    # CPU tensors: auto-selection never picks triton (it is the interpreter there)
    assert (
        _dispatch.select(
            "gather_tokens", mmkernels.reduce.api.ReduceCall("gather_tokens", "cpu", "float32"), "cpu"
        ).name
        != "triton"
    )
    cuda_call = mmkernels.reduce.api.ReduceCall("tome_merge", "cuda", "bfloat16")
    assert _dispatch.select("tome_merge", cuda_call, "cuda").name == "triton"


def test_compile_targets_cover_every_config():
    targets = T.compile_targets((80, 90))
    assert len(targets) == 38
    assert len({(t.kernel, t.label, t.capability) for t in targets}) == len(targets)
    assert all(t.needs_tensor_cores == (t.kernel == "_tome_match_kernel" and t.dtype != "fp32") for t in targets)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_matches_reference(dtype):
    """Compiled kernels on CUDA tensors (auto-selected) against the reference / float64 oracle."""
    metric = torch.randn(4, 577, 64, device="cuda").to(dtype)
    plan = mmkernels.tome_plan(metric, 200, protect_first=1)
    assert plan_pairs(plan) == naive_plan(metric.cpu(), 200, 1)
    x = torch.randn(4, 577, 768, device="cuda").to(dtype)
    x_out, s_out = mmkernels.tome_merge(x, plan)
    want_x, want_s = R.tome_merge(x, plan.src_to_out, plan.num_out, torch.ones(4, 577, device="cuda"))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x_out, want_x, atol=tol, rtol=tol)
    torch.testing.assert_close(s_out, want_s)
    torch.testing.assert_close(mmkernels.tome_unmerge(x_out, plan), R.tome_unmerge(x_out, plan.src_to_out))
    scores = torch.randint(0, 50, (4, 577), device="cuda").to(dtype)
    idx = mmkernels.select_tokens(scores, 100, protect_first=1)
    assert torch.equal(idx, R.select_tokens(scores, 100, 1))
    assert torch.equal(mmkernels.gather_tokens(x, idx), R.gather_tokens(x, idx))
