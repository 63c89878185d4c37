"""Argument checks of the token-reduction primitives: errors name the argument, what was seen and
what was expected; malformed packed cu_seqlens are refused eagerly and under torch.compile."""

import pytest
import torch

import mmkernels


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


@pytest.mark.parametrize(
    "cu, err, message",
    BAD_CU
    + [
        ([0, 5], ValueError, r"cu_seqlens \(B\+1,\) = \(3,\), got .* cu_seqlens int64\[2\]"),
        ([0, 2, 3, 5], ValueError, r"cu_seqlens \(B\+1,\) = \(3,\), got .* cu_seqlens int64\[4\]"),
    ],
)
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
    f = torch.compile(lambda x, i, c: mmkernels.gather_tokens(x, i, c) * 2, fullgraph=True, backend="aot_eager")
    good = torch.tensor([0, 3, 5])
    torch.testing.assert_close(f(X, IDX, good), mmkernels.gather_tokens(X, IDX, good) * 2)
    for cu, _err, message in BAD_CU:
        with pytest.raises(Exception, match=message):
            f(X, IDX, torch.tensor(cu))
    with pytest.raises(Exception, match=r"idx values must be in \[0, 5\), got \[0, 7\]"):
        f(X, torch.tensor([0, 1, 2, 0, 7]), good)


def test_bad_inputs():
    metric = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"r=6 must be in \[0, 4\].*4 tokens can merge"):
        mmkernels.tome_plan(metric, 6)
    with pytest.raises(ValueError, match=r"metric must be 3-D"):
        mmkernels.tome_plan(metric[0], 1)
    with pytest.raises(TypeError, match=r"r must be a Python int"):
        mmkernels.tome_plan(metric, 1.0)
    plan = mmkernels.tome_plan(metric, 2)
    with pytest.raises(ValueError, match=r"the plan was made for \(2, 10\)"):
        mmkernels.tome_merge(torch.randn(2, 11, 3), plan)
    with pytest.raises(ValueError, match=r"size must be \(B, N\)"):
        mmkernels.tome_merge(torch.randn(2, 10, 3), plan, torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"x_out has \(2, 10\)"):
        mmkernels.tome_unmerge(torch.randn(2, 10, 3), plan)
    with pytest.raises(TypeError, match=r"plan must be a TomePlan"):
        mmkernels.tome_merge(torch.randn(2, 10, 3), tuple(plan))
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, 10\]"):
        mmkernels.select_tokens(torch.rand(2, 10), 11)
    with pytest.raises(ValueError, match=r"every k must be in"):
        mmkernels.select_tokens(torch.rand(2, 10), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"idx values must be in \[0, 10\)"):
        mmkernels.gather_tokens(torch.randn(2, 10, 3), torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(TypeError, match=r"idx must be an int64/int32 tensor"):
        mmkernels.gather_tokens(torch.randn(2, 10, 3), torch.zeros(2, 2))
