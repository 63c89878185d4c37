"""Hypothesis fuzzing of shapes and options, every backend against the float64 oracle."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import assert_matches_oracle


@st.composite
def attention_case(draw):
    varlen = draw(st.booleans())
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    d = 8 * draw(st.integers(1, 16))
    dv = draw(st.sampled_from([d, 8 * draw(st.integers(1, 16))]))
    if varlen:
        n = draw(st.integers(1, 4))
        lens_q = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
        lens_k = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    else:
        b = draw(st.integers(1, 3))
        lens_q = [draw(st.integers(1, 48))] * b
        lens_k = [draw(st.integers(1, 48))] * b
    return dict(
        varlen=varlen,
        hq=hq,
        hkv=hkv,
        d=d,
        dv=dv,
        lens_q=lens_q,
        lens_k=lens_k,
        causal=draw(st.booleans()),
        bias=draw(st.sampled_from([None, "key", "head"])),
        scores=draw(st.sampled_from(["cls", "last", "mean"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    hq, hkv, d, dv = case["hq"], case["hkv"], case["d"], case["dv"]
    lq, lk = case["lens_q"], case["lens_k"]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    kwargs = dict(causal=case["causal"], scores=case["scores"])
    if case["varlen"]:
        tq, tk = sum(lq), sum(lk)
        q, k, v = rand(tq, hq, d), rand(tk, hkv, d), rand(tk, hkv, dv)
        kwargs["cu_seqlens_q"] = torch.tensor(
            [0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=device
        )
        kwargs["cu_seqlens_k"] = torch.tensor(
            [0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=device
        )
        bias_shape = {"key": (tk,), "head": (tk, hq)}.get(case["bias"])
    else:
        b = len(lq)
        q, k, v = rand(b, hq, lq[0], d), rand(b, hkv, lk[0], d), rand(b, hkv, lk[0], dv)
        bias_shape = {"key": (b, lk[0]), "head": (b, hq, lk[0])}.get(case["bias"])
    if bias_shape:
        bias = rand(*bias_shape)
        bias[torch.rand(bias_shape, generator=g).to(device) < 0.2] = float("-inf")
        kwargs["key_bias"] = bias
    return q, k, v, kwargs


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=attention_case())
def test_fuzz_against_oracle(backend, case):
    name, device = backend
    q, k, v, kwargs = build(case, device)
    assert_matches_oracle(q, k, v, name, **kwargs)
