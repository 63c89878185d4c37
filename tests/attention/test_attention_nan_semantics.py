"""NaN / inf semantics of ``mmkernels.attention`` (docs/nan_semantics.md), the same on every backend.

Every case poisons one element (a query row, a key, a value, a bias entry) and checks, on every
backend (reference; cpu on each ISA path this CPU runs, forced with MMKERNELS_CPU_ISA; triton in the
interpreter), that NaN appears exactly where the rules put it:

* a key is *seen* by a row unless causality excludes it or its key_bias is -inf; a key that is not
  seen is never read (NaN in its k, v or q.k does not matter);
* a NaN row (NaN in q, or a NaN / +inf logit among the keys it sees: NaN in k, NaN or +inf
  key_bias): out and lse NaN; its probabilities are NaN on the keys it sees, so the scores of those
  keys are NaN when the row counts for the scores;
* a NaN or inf in v[j, c]: out[i, c] NaN for every row i that sees key j (lse and scores finite);
* a row that sees no key: out 0, lse -inf, whatever q holds.

The expected NaN pattern is computed from these rules here, independently of the backends; the
other elements must equal the float64 reference run on the same inputs with the poison replaced
by a finite value (rows that do not read it cannot tell the difference). conftest sets
MMKERNELS_DEBUG_POISON=1: outputs start as NaN, so an element a backend forgets to write fails.
"""

import pytest
import torch

import mmkernels

NAN, INF = float("nan"), float("inf")
# NaN inputs on purpose: numpy (Triton's interpreter) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
EVERY_CPU_ISA = True  # conftest's backend fixture: the cpu backend once per ISA path


DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="f16"),
]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative to max(1, |want|)


# ----------------------------------------------------------------------------------------------
# The rules, written out on dense (B, H, L, D) tensors
# ----------------------------------------------------------------------------------------------
def expected_nan(q, k, v, bias, causal, scores):
    """(out NaN mask, lse NaN mask, empty-row mask, scores NaN mask) from the rules above."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    qd, kd, vd = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    seen = torch.ones(b, hq, lq, lk, dtype=torch.bool)
    if causal:
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        seen &= j <= i + (lk - lq)
    # logits in float64: NaN / +-inf come out as IEEE arithmetic gives them (order-independent)
    logits = qd @ kd.transpose(-1, -2)
    if bias is not None:
        bb = bias.double()
        bb = (bb[:, None, :] if bb.dim() == 2 else bb).expand(b, hq, lk)
        seen &= (bb != -INF)[:, :, None, :]
        logits = logits + bb[:, :, None, :]
    empty = ~seen.any(-1)
    nan_row = (seen & (logits.isnan() | (logits == INF))).any(-1)
    v_bad = ~torch.isfinite(vd)  # (b, hq, lk, dv)
    col = (seen.double() @ v_bad.double()) > 0
    out_nan = nan_row[..., None] | col
    rows = {None: None, "cls": slice(0, 1), "last": slice(lq - 1, lq), "mean": slice(0, lq)}[scores]
    sc_nan = None
    if scores:
        sc_nan = (nan_row[..., None] & seen)[:, :, rows].any(2).any(1)
    return out_nan, nan_row, empty, sc_nan


def clean(t, value=0.0):
    """t with NaN / +-inf replaced by `value` (keeps -inf in biases: pass keep_neginf)."""
    return None if t is None else torch.where(torch.isfinite(t), t, torch.full_like(t, value))


def clean_bias(bias):
    if bias is None:
        return None
    return torch.where(bias.isnan() | (bias == INF), torch.zeros_like(bias), bias)


def skip_slow_f16(backend, dtype):
    """float16 is here for the cpu kernel (widened to fp32 on its own code path); the Triton
    interpreter's half path is covered by bfloat16 (keeps CI short), float16 on the GPU."""
    if backend[0] == "triton" and backend[1] == "cpu" and dtype == torch.float16:
        pytest.skip("float16 in the Triton interpreter: bfloat16 covers its half path")


def run_case(backend, q, k, v, bias=None, causal=False, scores=None, oracle_raw=False):
    name, _ = backend
    if name == "cpu" and q.dtype == torch.float64:
        pytest.skip("cpu runs float32 / bfloat16 / float16")
    skip_slow_f16(backend, q.dtype)
    got = mmkernels.attention(q, k, v, key_bias=bias, causal=causal, scores=scores, return_lse=True, backend=name)
    out_nan, lse_nan, empty, sc_nan = expected_nan(q, k, v, bias, causal, scores)
    if oracle_raw:  # the float64 reference on the poisoned inputs themselves
        want = mmkernels.reference_attention(
            q.double(),
            k.double(),
            v.double(),
            key_bias=None if bias is None else bias.double(),
            causal=causal,
            scores=scores,
        )
    else:
        want = mmkernels.reference_attention(
            clean(q).double(),
            clean(k).double(),
            clean(v).double(),
            key_bias=None if bias is None else clean_bias(bias).double(),
            causal=causal,
            scores=scores,
        )
    tol = TOL[q.dtype]

    def compare(what, g, w, nan_mask):
        g = g.double()
        assert torch.equal(g.isnan(), nan_mask), (
            f"{what}: NaN at {g.isnan().nonzero().tolist()[:8]}, expected at {nan_mask.nonzero().tolist()[:8]}"
        )
        ok = ~nan_mask
        assert torch.isfinite(w[ok]).all() or what == "lse"
        err = (g[ok] - w[ok]).abs()
        err = torch.where(torch.isinf(w[ok]) & (g[ok] == w[ok]), torch.zeros_like(err), err)
        assert err.max().item() <= tol * max(1.0, w[ok].abs().max().item()) if err.numel() else True, (
            f"{what}: max error {err.max().item():.3g}"
        )

    compare("out", got.out, want[0], out_nan)
    compare("lse", got.lse, want[1], lse_nan)
    assert torch.equal(got.lse.double()[empty], torch.full_like(got.lse.double()[empty], -INF))
    assert (got.out[empty] == 0).all()
    if scores:
        compare("scores", got.scores, want[2], sc_nan)
    return got, out_nan


def inputs(dtype, b=2, hq=2, hkv=1, lq=9, lk=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    return q, k, v


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scores", ["cls", "last", "mean"])
def test_nan_in_key(backend, dtype, causal, scores):
    q, k, v = inputs(dtype)
    k[0, 0, 3, 5] = NAN
    got, out_nan = run_case(backend, q, k, v, causal=causal, scores=scores)
    assert out_nan[0].any() and not out_nan[1].any()
    if causal:  # rows 0..2 do not see key 3
        assert not out_nan[0, :, :3].any() and out_nan[0, :, 3:].all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_key_masked_by_bias_is_never_read(backend, dtype, causal):
    q, k, v = inputs(dtype)
    bias = torch.randn(2, 9)
    k[0, 0, 3] = NAN
    v[0, 0, 3] = NAN
    k[1, 0, 8, 0] = INF
    v[1, 0, 8, 1] = -INF
    bias[0, 3] = -INF
    bias[1, 8] = -INF
    _, out_nan = run_case(backend, q, k, v, bias=bias, causal=causal, scores="mean")
    assert not out_nan.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_inf_in_key(backend, dtype, causal):
    """+inf in k[j, d]: the logit is +inf (a NaN row) where q[i, d] > 0 and -inf (probability 0,
    the row stays finite) where q[i, d] < 0; IEEE arithmetic, the same on every backend."""
    q, k, v = inputs(dtype)
    k[0, 0, 3, 5] = INF
    k[1, 0, 6, 2] = -INF
    q[:, :, :, 5] = torch.where(torch.arange(9)[:, None] % 2 == 0, 1.0, -1.0).expand(2, 2, 9, 1)[..., 0]
    q[:, :, :, 2] = q[:, :, :, 5]
    _, out_nan = run_case(backend, q, k, v, causal=causal, scores="mean", oracle_raw=True)
    rows = torch.arange(9) % 2 == 0  # q[i, 5] = q[i, 2] = +1 on even rows
    if causal:
        assert torch.equal(out_nan[0, :, :, 0], (rows & (torch.arange(9) >= 3)).expand(2, 9))
        assert torch.equal(out_nan[1, :, :, 0], (~rows & (torch.arange(9) >= 6)).expand(2, 9))
    else:
        assert torch.equal(out_nan[0, :, :, 0], rows.expand(2, 9))
        assert torch.equal(out_nan[1, :, :, 0], (~rows).expand(2, 9))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_query_row(backend, dtype):
    q, k, v = inputs(dtype)
    q[0, 1, 2, 4] = NAN
    _, out_nan = run_case(backend, q, k, v, scores="cls")
    assert out_nan[0, 1, 2].all() and out_nan.sum() == out_nan[0, 1, 2].numel()
    _, out_nan = run_case(backend, q, k, v, scores="mean")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nonfinite_value(backend, dtype, value, causal):
    q, k, v = inputs(dtype, hq=4, hkv=2)
    v[0, 1, 3, 5] = value  # kv head 1 -> query heads 2, 3
    bias = torch.zeros(2, 4, 9)
    bias[1, :, 3] = -INF  # batch 1: key 3 masked, its poisoned v never read
    v[1, 0, 3, 7] = value
    _, out_nan = run_case(backend, q, k, v, bias=bias, causal=causal, scores="mean")
    want = torch.zeros_like(out_nan)
    want[0, 2:, (3 if causal else 0) :, 5] = True
    assert torch.equal(out_nan, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [INF, NAN], ids=["posinf", "nan"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bias_posinf_or_nan(backend, dtype, value, causal):
    q, k, v = inputs(dtype)
    bias = torch.randn(2, 2, 9)
    bias[0, 1, 4] = value  # head 1 of batch 0 only
    _, out_nan = run_case(backend, q, k, v, bias=bias, causal=causal, scores="last")
    assert out_nan[0, 1, 4:].all() and not out_nan[0, 0].any() and not out_nan[1].any()
    assert out_nan[0, 1, :4].any() == (not causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_stay_zero(backend, dtype):
    q, k, v = inputs(dtype)
    bias = torch.zeros(2, 9)
    bias[0] = -INF  # batch 0: every key masked
    q[0, 0, 1] = NAN
    k[0, 0, 2] = NAN
    v[0, 0, 5] = INF
    got, out_nan = run_case(backend, q, k, v, bias=bias, scores="mean")
    assert not out_nan.any()
    assert (got.out[0] == 0).all() and (got.lse[0] == -INF).all() and (got.scores[0] == 0).all()
    # causal with more queries than keys: the first rows see nothing, even with a NaN query
    q, k, v = inputs(dtype, lq=12, lk=5)
    q[1, 1, 0] = NAN
    q[1, 1, 9] = NAN
    _, out_nan = run_case(backend, q, k, v, causal=True, scores="cls")
    assert out_nan[1, 1, 9].all() and out_nan.sum() == out_nan[1, 1, 9].numel()


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_sequences(backend, dtype):
    """Several key blocks (CPU: > 320 keys leaves the single-block path; the kept-probability
    scores path), a NaN logit in a block whose other keys are all masked, NaN rows that count
    for the scores, and masked keys inside them."""
    name, _ = backend
    q, k, v = inputs(dtype, b=1, hq=2, hkv=1, lq=130, lk=400, d=16, seed=1)
    k[0, 0, 350, 3] = NAN
    run_case(backend, q, k, v, causal=True, scores="cls")  # rows >= 80 see key 350
    run_case(backend, q, k, v, causal=True, scores="last")
    # the first 64-key block holds only key 5 (NaN) unmasked: the max alone would drop it
    q, k, v = inputs(dtype, b=1, hq=2, hkv=1, lq=20, lk=400, d=16, seed=2)
    bias = torch.zeros(1, 400)
    bias[0, :64] = -INF
    bias[0, 5] = 0.0
    k[0, 0, 5, 0] = NAN
    _, out_nan = run_case(backend, q, k, v, bias=bias, scores="mean")
    assert out_nan.all()
    # a NaN query row counts for the scores: NaN on the keys it sees, 0 on the masked ones
    q, k, v = inputs(dtype, b=1, hq=2, hkv=2, lq=40, lk=400, d=16, seed=3)
    bias = torch.zeros(1, 400)
    bias[0, 10:20] = -INF
    q[0, 0, 0, 1] = NAN
    v[0, 1, 370, 2] = NAN
    got, _ = run_case(backend, q, k, v, bias=bias, causal=True, scores="cls")
    run_case(backend, q, k, v, bias=bias, scores="cls")
    got, _ = run_case(backend, q, k, v, bias=bias, scores="mean")
    assert (got.scores[0, 10:20] == 0).all() and got.scores[0, :10].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(backend, dtype):
    """Packed sequences: a NaN key of one sequence does not reach the others."""
    name, _ = backend
    skip_slow_f16(backend, dtype)
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 5, 12, 15], dtype=torch.int32)
    q = torch.randn(15, 2, 16, generator=g).to(dtype)
    k = torch.randn(15, 1, 16, generator=g).to(dtype)
    v = torch.randn(15, 1, 16, generator=g).to(dtype)
    k[7, 0, 2] = NAN  # sequence 1, its key 2
    v[13, 0, 4] = NAN  # sequence 2, its key 1
    got = mmkernels.attention(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, return_lse=True, scores="mean", backend=name
    )
    out_nan = got.out.isnan()
    want = torch.zeros_like(out_nan)
    want[7:12] = True  # rows 2.. of sequence 1 see its key 2
    want[13:15, :, 4] = True  # rows 1.. of sequence 2 see its key 1, column 4
    assert torch.equal(out_nan, want)
    lse_nan = torch.zeros_like(got.lse, dtype=torch.bool)
    lse_nan[7:12] = True  # v does not reach the lse
    assert torch.equal(got.lse.isnan(), lse_nan)
    assert torch.equal(got.scores.isnan(), torch.tensor([False] * 5 + [True] * 7 + [False] * 3))
    ref = mmkernels.reference_attention(
        q.double(), clean(k).double(), clean(v).double(), cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True
    )
    tol = TOL[dtype]
    assert (got.out.double()[~want] - ref[0][~want]).abs().max() <= tol * max(1.0, ref[0].abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scores", [None, "mean"], ids=["plain", "scores"])
def test_decoding(backend, dtype, scores):
    """One query row per head against a long cache (the CPU kernel packs each key block per item
    and, without scores, takes a kv head's query heads as one item's rows): a NaN / inf in v of
    a key in a later block, a NaN k behind a -inf bias, a NaN query row, a fully masked head."""
    q, k, v = inputs(dtype, b=2, hq=6, hkv=2, lq=1, lk=700, d=16, seed=4)
    v[0, 1, 650, 3] = INF  # kv head 1 -> query heads 3, 4, 5 of batch 0
    v[1, 0, 100, 0] = NAN
    k[1, 1, 400, 2] = NAN  # masked for batch 1 below: never read
    q[1, 4, 0, 5] = NAN  # a NaN row
    bias = torch.zeros(2, 700)
    bias[1, 400] = -INF
    _, out_nan = run_case(backend, q, k, v, bias=bias, causal=True, scores=scores)
    assert out_nan[0, 3:, 0, 3].all() and out_nan[1, :3, 0, 0].all() and out_nan[1, 4].all()
    per_head = torch.zeros(2, 6, 700)
    per_head[0, 2] = -INF  # batch 0, head 2 sees no key: out 0, lse -inf
    run_case(backend, q, k, v, bias=per_head, scores=scores)
