"""The ``torch`` attention backend (PyTorch's CPU flash attention, SDPA's kernel): the float64
oracle on the calls it declares, the library's NaN semantics on them (docs/nan_semantics.md,
including its rare path), and the auto-selection rule per CPU class (monkeypatched: never a
timing)."""

import math

import pytest
import torch

import mmkernels
from mmkernels import _dispatch
from backend_params import attention_call
from oracle import assert_matches_oracle

NAN, INF = float("nan"), float("inf")
TORCH = {b.name: b for b in _dispatch.backends_for("attention")}["torch"]
pytestmark = pytest.mark.skipif(not TORCH.availability()[0], reason=str(TORCH.availability()[1]))


def qkv(b, hq, hkv, lq, lk, d, dtype=torch.float32):
    """(B, H, L, D) views of (B, L, H, D) tensors (non-contiguous, as projections give them)."""

    def r(h, n):
        return torch.randn(b, n, h, d).to(dtype).transpose(1, 2)

    return r(hq, lq), r(hkv, lk), r(hkv, lk)


@pytest.mark.parametrize(
    "shape",
    [(2, 2, 2, 1, 1, 64), (3, 4, 2, 7, 7, 40), (1, 6, 2, 197, 197, 72), (2, 3, 1, 33, 257, 80), (1, 2, 2, 257, 31, 36)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_matches_the_oracle(shape, dtype):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype)
    assert_matches_oracle(q, k, v, "torch", scale=0.9 / math.sqrt(d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_key_bias_with_masked_keys_and_a_fully_masked_sequence(dtype):
    q, k, v = qkv(3, 4, 2, 19, 23, 64, dtype)
    bias = torch.randn(3, 23) * 3
    bias[0, 5:9] = -INF
    bias[2] = -INF  # sequence 2 sees no key: out 0, lse -inf
    res = assert_matches_oracle(q, k, v, "torch", key_bias=bias)
    assert torch.equal(res.out[2], torch.zeros_like(res.out[2]))
    assert torch.equal(res.lse[2], torch.full_like(res.lse[2], -INF))
    per_head = torch.randn(3, 4, 23)  # (B, H, Lk) biases too
    assert_matches_oracle(q, k, v, "torch", key_bias=per_head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", [(2, 6, 2, 13, 29, 40), (2, 9, 3, 1, 700, 64)], ids=["gqa", "decode"])
def test_gqa_without_lse_reads_the_shared_heads(dtype, shape):
    """Without lse, GQA calls go to SDPA's enable_gqa (no copy of K / V); out as the oracle's."""
    b, hq, hkv, lq, lk, d = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype)
    bias = torch.randn(b, lk)
    bias[0] = -INF  # sequence 0 sees no key: out 0
    bias[-1, 3] = -INF
    for key_bias in (None, bias):
        got = mmkernels.attention(q, k, v, key_bias=key_bias, backend="torch")
        want = mmkernels.attention(q, k, v, key_bias=key_bias, return_lse=True, backend="reference")
        low = mmkernels.attention(q, k, v, key_bias=key_bias, backend="reference")
        ref64 = mmkernels.attention(
            q.double(),
            k.double(),
            v.double(),
            key_bias=None if key_bias is None else key_bias.double(),
            backend="reference",
        )
        tol = 2 * (low.double() - ref64).abs().max().item() + 1e-5
        assert (got.double() - ref64).abs().max().item() <= tol
        if key_bias is not None:
            assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(want.out[0], torch.zeros_like(got[0]))


def _same_as_reference(q, k, v, bias=None):
    got = mmkernels.attention(q, k, v, key_bias=bias, return_lse=True, backend="torch")
    want = mmkernels.attention(
        q.double(),
        k.double(),
        v.double(),
        return_lse=True,
        key_bias=None if bias is None else bias.double(),
        backend="reference",
    )
    for name, g, w in (("out", got.out, want.out), ("lse", got.lse, want.lse)):
        g, w = g.double(), w.double()
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN pattern differs"
        assert torch.equal(g == -INF, w == -INF), f"{name}: -inf pattern differs"
        ok = torch.isfinite(w)
        torch.testing.assert_close(g[ok], w[ok], atol=1e-5, rtol=1e-4)
    return got


def _poison(case):
    q, k, v = qkv(2, 2, 2, 6, 9, 16)
    bias = None
    if case == "nan_q_row":
        q[0, 1, 2, 3] = NAN
    elif case == "nan_k":
        k[1, 0, 4, 0] = NAN
    elif case in ("posinf_k", "neginf_k"):  # rare path (+-inf logits)
        k[0, 0, 3, 5] = INF if case == "posinf_k" else -INF
    elif case == "neginf_q_row":  # every logit of a row -inf: lse -inf
        q[1, 1, 0] = -INF
        k[1, 1] = 1.0
    elif case in ("nan_v", "posinf_v", "neginf_v"):
        v[0, 1, 7, 2] = {"nan_v": NAN, "posinf_v": INF, "neginf_v": -INF}[case]
    elif case == "masked_key_never_read":  # a -inf key holding NaN k / inf v
        bias = torch.randn(2, 9)
        bias[0, 3] = -INF
        k[0, 0, 3, 1] = NAN
        v[0, 1, 3, 0] = INF
    elif case == "fully_masked_with_nan_v":
        bias = torch.zeros(2, 9)
        bias[0] = -INF
        v[0, 0, 5] = INF
    elif case in ("posinf_bias", "nan_bias"):
        bias = torch.randn(2, 2, 9)
        bias[0, 1, 4] = INF if case == "posinf_bias" else NAN
    return q, k, v, bias


@pytest.mark.parametrize(
    "case",
    [
        "nan_q_row",
        "nan_k",
        "posinf_k",
        "neginf_k",
        "neginf_q_row",
        "nan_v",
        "posinf_v",
        "neginf_v",
        "masked_key_never_read",
        "fully_masked_with_nan_v",
        "posinf_bias",
        "nan_bias",
    ],
)
def test_nan_semantics_are_the_library_s(case):
    q, k, v, bias = _poison(case)
    _same_as_reference(q, k, v, bias)


@pytest.mark.parametrize("precheck", ["scan", "sums"])
def test_finite_values_near_the_float32_limit(monkeypatch, precheck):
    """Finite values near float32's limit are finite to the scan (the call stays on SDPA); the
    fallback pre-check without the extension is a sum, which they overflow: that may only send
    the call to the reference (exact), never change the answer."""
    from mmkernels.attention import reference as attention_reference
    from mmkernels.attention import sdpa

    if precheck == "sums":
        monkeypatch.setattr(sdpa._EXT, "ops", lambda required: None)
    elif sdpa._EXT.ops(sdpa._SCAN_OP) is None:
        pytest.skip("the extension is not built")
    q, k, v = qkv(1, 2, 2, 9, 9, 16)
    q[0, 0, :, :] = 1.0e37  # the sum of q overflows float32; q.k (~1e38) does not
    calls = []
    real = attention_reference.attention_forward
    with monkeypatch.context() as m:
        m.setattr(attention_reference, "attention_forward", lambda *a: calls.append(1) or real(*a))
        mmkernels.attention(q, k, v, backend="torch")
    assert bool(calls) == (precheck == "sums"), "the rare path ran" if calls else "the rare path did not run"
    _same_as_reference(q, k, v, None)


def test_refuses_what_it_does_not_serve_with_every_reason():
    q, k, v = qkv(1, 2, 2, 5, 5, 16)
    with pytest.raises(_dispatch.NoBackendError) as info:
        mmkernels.attention(q, k, v[..., :8], causal=True, scores="cls", backend="torch")
    first = str(info.value).split("\n")[0]
    for text in ("causal: SDPA's is_causal is top-left aligned", "scores: SDPA forms no", "D=16 != Dv=8"):
        assert text in first


# --- the auto-selection rule (the CPU class is monkeypatched; never a timing) --------------------


def _call(dtype="float32", **kw):
    return attention_call(dtype, **kw)


CPU_OK = {b.name: b for b in _dispatch.backends_for("attention")}["cpu"].availability()[0]


@pytest.mark.skipif(not CPU_OK, reason="the rule compares with the cpu backend")
@pytest.mark.parametrize("klass", ["avx512", "avx2"])
def test_without_amx_our_cpu_kernel_stays_the_choice(cpu_class, klass):
    cpu_class(klass)
    for dtype in ("float32", "bfloat16", "float16"):
        for kw in ({}, {"has_bias": True}, {"return_lse": True}, {"causal": True}, {"scores": "cls"}):
            assert _dispatch.select("attention", _call(dtype, **kw), "cpu").name == "cpu", (dtype, kw)
    chosen, trail = _dispatch.auto_choice("attention", _call(), "cpu")
    assert chosen.name == "cpu" and "without AMX: our cpu kernel is faster" in dict(trail)["torch"]


@pytest.mark.skipif(not CPU_OK, reason="the rule compares with the cpu backend")
def test_on_amx_torch_takes_the_calls_it_serves(cpu_class):
    cpu_class("amx")
    for dtype in ("float32", "bfloat16", "float16"):
        for kw in ({}, {"has_bias": True}, {"return_lse": True}, {"num_heads_kv": 4}):
            assert _dispatch.select("attention", _call(dtype, **kw), "cpu").name == "torch", (dtype, kw)
        for kw in ({"causal": True}, {"scores": "mean"}, {"varlen": True}, {"head_dim_v": 32}):
            assert _dispatch.select("attention", _call(dtype, **kw), "cpu").name == "cpu", (dtype, kw)
    assert _dispatch.select("attention", _call("float64"), "cpu").name == "reference"
    assert _dispatch.select("attention", _call(), "cpu", backend="cpu").name == "cpu"
    # and a real call runs through it
    q, k, v = qkv(1, 2, 2, 9, 9, 16)
    want = mmkernels.attention(q, k, v, backend="reference")
    torch.testing.assert_close(mmkernels.attention(q, k, v), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("klass", ["avx512", "amx"])
def test_calls_our_cpu_kernel_cannot_take_go_to_torch_not_the_reference(cpu_class, klass, recwarn):
    """Odd head dims: SDPA beats the reference on every CPU class."""
    cpu_class(klass)
    for dtype in ("float32", "bfloat16", "float16"):
        assert _dispatch.select("attention", _call(dtype, head_dim=36, head_dim_v=36), "cpu").name == "torch"
    assert _dispatch.select("attention", _call("float16", head_dim=36, head_dim_v=36, causal=True), "cpu").name == (
        "reference"
    )


@pytest.mark.skipif(not CPU_OK, reason="the rule compares with the cpu backend")
def test_float16_is_served_by_our_cpu_kernel(cpu_class):
    """float16 is widened to fp32 (F16C) by our kernel: no refusal, no "AVX512-FP16" note left."""
    cpu_class("avx512")
    call = _call("float16")
    cpu = {b.name: b for b in _dispatch.backends_for("attention")}["cpu"]
    assert cpu.reasons(call) == []
    assert "AVX512-FP16" not in " ".join(str(n) for n in cpu.dtype_notes.values())
    for kw in ({"scores": "mean"}, {"varlen": True}, {"causal": True}):
        assert _dispatch.select("attention", _call("float16", **kw), "cpu").name == "cpu", kw
    q, k, v = qkv(2, 4, 2, 21, 23, 40, torch.float16)
    assert_matches_oracle(q, k, v, None, scores="cls", causal=True)


@pytest.mark.skipif(not CPU_OK, reason="the bench's mmkernels contender is the cpu kernel")
@pytest.mark.parametrize("klass", ["avx512", "amx"])
def test_bench_times_our_kernel_and_shows_what_auto_selection_picks(cpu_class, klass):
    """The attention bench's ``mmkernels`` contender is our C++ kernel on every CPU class (the gates
    measure it); on AMX, where auto-selection serves plain calls with torch, ``mmkernels_auto``
    joins the plain case."""
    from mmkernels.benchmarks import attention as bench

    cpu_class(klass)
    plain = bench.all_cases(quick=True)[0]
    assert ("mmkernels_auto" in plain.contenders) == (klass == "amx")
    assert bench._kernel_backend() == "cpu"


@pytest.mark.parametrize(
    "shape, masked",
    [((2, 4, 4, 9, 11, 16), False), ((1, 6, 2, 1, 40, 32), False), ((2, 4, 2, 5, 7, 16), True)],
    ids=["mha", "gqa_decode", "fully_masked_rows"],
)
def test_sdpa_output_is_returned_in_the_public_layout(shape, masked):
    """The backend hands SDPA's own output back (no copy) where it is laid out as ours; the
    public output keeps its layout either way: out.transpose(1, 2) contiguous."""
    b, hq, hkv, lq, lk, d = shape
    q, k, v = qkv(b, hq, hkv, lq, lk, d)
    bias = None
    if masked:
        bias = torch.zeros(b, lk)
        bias[1] = float("-inf")  # every key of sequence 1 masked
    out = mmkernels.attention(q, k, v, key_bias=bias, backend="torch")
    assert out.shape == (b, hq, lq, d) and out.transpose(1, 2).is_contiguous()
    double = None if bias is None else bias.double()
    want = mmkernels.attention(q.double(), k.double(), v.double(), key_bias=double, backend="reference")
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


def test_a_backend_output_of_another_layout_is_refused(monkeypatch):
    q, k, v = qkv(1, 2, 2, 5, 5, 16)
    monkeypatch.setattr(TORCH, "run", lambda *args: torch.zeros(1, 2, 5, 16))  # (B, H, L, D) strides
    with pytest.raises(RuntimeError, match=r"attention backend 'torch' returned an output of shape"):
        mmkernels.attention(q, k, v, backend="torch")
