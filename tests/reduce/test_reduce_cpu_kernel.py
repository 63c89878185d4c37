"""The C++ CPU reduce kernels (mmkernels._C reduce_*) against the reference, bit for bit.

The shared tests (test_reduce_correctness.py) already run the cpu backend against a float64 oracle; these
add the exactness the kernel promises: the same plan as the reference for random float32 /
bfloat16 / float16 metrics of any strides, merges identical to the reference's float32 arithmetic,
and the AVX2 and scalar paths (MMKERNELS_CPU_ISA=avx2 | scalar) agreeing with the AVX-512 one.
"""

import random

import pytest
import torch

from mmkernels.reduce import cpu, reference
from mmkernels.reduce.api import mergeable_a_tokens

pytestmark = pytest.mark.skipif(
    not cpu.is_available(), reason=f"mmkernels._C reduce kernels unavailable: {cpu.LOAD_ERROR}"
)


@pytest.fixture(params=["auto", "avx2", "scalar"])
def isa(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("MMKERNELS_CPU_ISA", request.param)
    return request.param


def test_plan_equals_reference(isa):
    rng = random.Random(0)
    torch.manual_seed(0)
    for trial in range(120):
        b = rng.choice([1, 2, 5])
        n = rng.choice([2, 3, 17, 50, 197, 257]) if trial % 4 else rng.randint(1, 90)
        c = rng.choice([1, 3, 16, 64, 65])
        pf = min(rng.choice([0, 1, 2, 3]), n)
        limit = mergeable_a_tokens(n, pf)
        r = min(limit, rng.choice([0, 1, limit, rng.randint(0, limit)]))
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        metric = torch.randn(b, c, n).to(dtype).transpose(1, 2) if trial % 2 else torch.randn(b, n, c).to(dtype)
        got = cpu.tome_plan(metric, r, pf)
        want = reference.tome_plan(metric, r, pf)
        for g, w, name in zip(got, want, ("src_to_out", "keep_idx", "src_idx", "dst_idx")):
            assert torch.equal(g, w), (name, b, n, c, pf, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_and_unmerge_equal_reference(isa, dtype, size_dtype):
    torch.manual_seed(1)
    for b, n, c in [(1, 197, 768), (3, 37, 100), (33, 5, 7), (2, 50, 1)]:
        r = mergeable_a_tokens(n, 1) // 2
        src_to_out, keep, _, _ = reference.tome_plan(torch.randn(b, n, 8), r, 1)
        x = torch.randn(b, 2 * n, c).to(dtype)[:, ::2]  # token stride 2C
        size = (torch.rand(b, n) * 3 + 0.5).to(size_dtype)
        got = cpu.tome_merge(x, src_to_out, keep.shape[1], size)
        want = reference.tome_merge(x, src_to_out, keep.shape[1], size)
        assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(cpu.tome_unmerge(want[0], src_to_out), reference.tome_unmerge(want[0], src_to_out))


def test_general_slots_merge():
    torch.manual_seed(2)
    src_to_out = torch.randint(0, 10, (3, 40))
    src_to_out[:, :10] = torch.arange(10)
    x, size = torch.randn(3, 40, 33), torch.rand(3, 40) + 0.1
    got = cpu.tome_merge(x, src_to_out, 10, size)
    want = reference.tome_merge(x, src_to_out, 10, size)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_select_equals_reference_with_ties(dtype):
    torch.manual_seed(3)
    for b, n in [(1, 197), (3, 98), (64, 10), (2, 1)]:
        scores = (torch.rand(b, n) * 4).round().to(dtype)  # many ties
        scores[:, ::3] = -0.0  # -0 ties +0
        for pf in (0, 1, 2):
            for k in sorted({min(pf, n), min(n, pf + 1), (n + pf) // 2, n}):
                if k < pf:
                    continue
                assert torch.equal(cpu.select_tokens(scores, k, pf), reference.select_tokens(scores, k, pf))
                assert torch.equal(
                    cpu.select_tokens(scores.t().contiguous().t(), k, pf), reference.select_tokens(scores, k, pf)
                )


def test_gather_any_dtype_and_bounds():
    x = torch.randint(0, 100, (2, 9, 5), dtype=torch.int16)
    idx = torch.tensor([[8, 0, 3], [1, 1, 2]])
    assert torch.equal(cpu.gather_tokens(x, idx), reference.gather_tokens(x, idx))
    with pytest.raises(RuntimeError, match=r"idx value -1 is outside \[0, 9\)"):
        cpu.gather_tokens(x, torch.tensor([[0, -1, 2], [1, 1, 2]]))
