"""NaN / inf semantics of ``mmkernels.tome_plan`` (docs/nan_semantics.md), the same on every backend.

A metric row holding a NaN or +-inf normalises to NaN, so its similarities are NaN, and a NaN
similarity counts as -inf:

* such a B token is nobody's best match while a finite similarity exists;
* such an A token's best match is the first B token with score -inf: it is chosen last among the
  A tokens (ties to the lower position), so it merges only when r reaches it;
* protected tokens are never compared: a NaN there changes nothing.

Every backend (reference; cpu on each ISA path this CPU runs, forced with MMKERNELS_CPU_ISA; triton in
the interpreter) must give the plan of the float64 Python definition below, for float32, bfloat16
and float16 metrics.
"""

import pytest
import torch

import mmkernels
from mmkernels.reduce.api import mergeable_a_tokens

NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN on purpose


EVERY_CPU_ISA = True  # conftest's backend fixture: the cpu backend once per ISA path


DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]


def naive_pairs(metric, r, protect_first):
    """(src, dst) pairs per batch row, in float64 Python: NaN similarity = -inf, first max."""
    out = []
    for row in metric.double():
        row = row / row.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n = row.shape[0]
        a = [i for i in range(protect_first, n) if i % 2 == 0]
        b = [j for j in range(protect_first, n) if j % 2 == 1]
        best = []
        for i in a:
            s_best, j_best = -INF, b[0]
            for j in b:
                s = float(row[i] @ row[j])
                if s > s_best:  # False for NaN: a NaN never wins
                    s_best, j_best = s, j
            best.append((s_best, i, j_best))
        best.sort(key=lambda t: (-t[0], t[1]))
        out.append(sorted((i, j) for _, i, j in best[:r]))
    return out


def check(backend, metric, r, protect_first):
    plan = mmkernels.tome_plan(metric, r, protect_first=protect_first, backend=backend.name)
    got = [sorted(zip(s.tolist(), d.tolist())) for s, d in zip(plan.src_idx, plan.dst_idx)]
    assert got == naive_pairs(metric, r, protect_first)
    if backend.name != "reference":  # the index maps too, as the reference builds them
        ref = mmkernels.tome_plan(metric, r, protect_first=protect_first, backend="reference")
        for g, w in zip(plan, ref):
            assert torch.equal(g, w)
    return got


def make(dtype, b=2, n=17, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_a_token_merges_last(backend, dtype, value):
    metric = make(dtype)
    metric[0, 4, 3] = value  # A token (protect_first=1: A = 2, 4, ...)
    limit = mergeable_a_tokens(17, 1)
    for r in (1, 4, limit - 1, limit):
        pairs = check(backend, metric, r, 1)
        srcs = [i for i, _ in pairs[0]]
        assert (4 in srcs) == (r == limit)
    assert (4, 1) in pairs[0]  # its match: the first B token


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_b_token_is_never_a_match(backend, dtype, value):
    metric = make(dtype, n=33, seed=1)
    metric[1, 5, 0] = value  # B token
    metric[1, 6] = metric[1, 5]  # the A token next to it: all its sims finite but one
    metric[1, 6, 0] = 1.0
    limit = mergeable_a_tokens(33, 1)
    for r in (3, limit):
        pairs = check(backend, metric, r, 1)
        assert all(j != 5 for _, j in pairs[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_similarity_nan(backend, dtype):
    """Every B token NaN: every A token scores -inf, matches the first B token, lower A first."""
    metric = make(dtype, n=20, seed=2)
    metric[:, 1::2, 0] = NAN
    for pf in (0, 1, 2):
        limit = mergeable_a_tokens(20, pf)
        for r in (1, limit // 2, limit):
            pairs = check(backend, metric, r, pf)
            first_b = pf + 1 - (pf % 2)
            a_first = pf + (pf % 2)
            assert pairs[0] == [(a_first + 2 * t, first_b) for t in range(r)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_protected_nan_changes_nothing(backend, dtype):
    metric = make(dtype, n=50, seed=3)
    clean = check(backend, metric, 12, 2)
    metric[:, 0] = NAN
    metric[:, 1, 5] = INF
    assert check(backend, metric, 12, 2) == clean


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_several_tiles(backend, dtype):
    """197 tokens (several A / B tiles on every backend), a scattering of poisoned tokens."""
    metric = make(dtype, b=2, n=197, c=40, seed=4)
    for t, ch in ((2, 0), (31, 7), (64, 39), (100, 1), (150, 20), (196, 3)):
        metric[t % 2, t, ch] = NAN if t % 3 else INF
    limit = mergeable_a_tokens(197, 1)
    for r in (16, 90, limit):
        check(backend, metric, r, 1)
