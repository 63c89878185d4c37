"""Plain eager calls memoise their argument checks per metadata (mmkernels.attention.api:
_checked_plan): a call that differs from an accepted one in any checked property (a dtype, a
device, a shape, a flag, the key_bias) is still refused with the same error, and the per-key bias
view taken on that path (as_strided, head stride 0) reads every layout of key_bias correctly."""

import math

import pytest
import torch

import mmkernels
from mmkernels.attention import api

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 5, 6, 32


def qkv(g):
    return [torch.randn(B, h, n, D, generator=g) for h, n in ((HQ, LQ), (HKV, LK), (HKV, LK))]


# (how the call differs from the accepted one, error type, message pattern)
DIFFERENT = [
    (lambda q, k, v: ((q, k.double(), v), {}), TypeError, r"share one dtype"),
    (lambda q, k, v: ((q, k, v.to(torch.int32)), {}), TypeError, r"v must be a floating tensor"),
    (lambda q, k, v: ((q, k, v.to("meta")), {}), ValueError, r"one device"),
    (lambda q, k, v: ((q, k[..., :16], v), {}), ValueError, r"same head dim"),
    (lambda q, k, v: ((q, k, v[:, :, :4]), {}), ValueError, r"v must match k"),
    (lambda q, k, v: ((q[:, :3], k, v), {}), ValueError, r"multiple of the number of key/value heads"),
    (lambda q, k, v: ((q[0], k, v), {}), ValueError, r"q must be 4-D"),
    (lambda q, k, v: ((q, k, v), {"causal": 1}), TypeError, r"causal must be a bool"),
    (lambda q, k, v: ((q, k, v), {"return_lse": 1}), TypeError, r"return_lse must be a bool"),
    (lambda q, k, v: ((q, k, v), {"scores": "max"}), ValueError, r"scores must be one of"),
    (lambda q, k, v: ((q, k, v), {"backend": 3}), TypeError, r"backend must be a str"),
    (lambda q, k, v: ((q, k, v), {"scale": float("inf")}), TypeError, r"scale must be a finite float"),
    (lambda q, k, v: ((q, k, v), {"scale": True}), TypeError, r"scale must be a finite float"),
    (
        lambda q, k, v: ((q, k, v), {"key_bias": torch.zeros(B, LK, dtype=torch.int64)}),
        TypeError,
        r"key_bias must be a floating tensor",
    ),
    (
        lambda q, k, v: ((q, k, v), {"key_bias": torch.zeros(B, LK, device="meta")}),
        ValueError,
        r"key_bias is on meta",
    ),
    (lambda q, k, v: ((q, k, v), {"key_bias": torch.zeros(B, LK + 1)}), ValueError, r"key_bias must have shape"),
]


@pytest.mark.parametrize("different, kind, pattern", DIFFERENT)
def test_a_call_differing_from_an_accepted_one_is_still_checked(different, kind, pattern):
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv(g)
    accepted = {"key_bias": torch.zeros(B, LK), "scale": 0.5}
    with torch.no_grad():
        for _ in range(2):  # the second call is served by the memoised plan
            mmkernels.attention(q, k, v, **accepted)
        mmkernels.attention(q, k, v)
        args, kwargs = different(q, k, v)
        with pytest.raises(kind, match=pattern):
            mmkernels.attention(*args, **kwargs)


def test_the_plan_is_memoised_per_metadata(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv(g)
    monkeypatch.setattr(api._CHECKED, "_calls", {})
    with torch.no_grad():
        mmkernels.attention(q, k, v)
        assert len(api._CHECKED._calls) == 1
        mmkernels.attention(*qkv(g))  # the same metadata, new values
        assert len(api._CHECKED._calls) == 1
        mmkernels.attention(q, k, v, causal=True)
        assert len(api._CHECKED._calls) == 2


def _reference(q, k, v, bias):
    """float64 attention with a (B or 1, Lk) per-key bias."""
    q, k, v, bias = (t.double() for t in (q, k, v, bias))
    k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(D) + bias[:, None, None, :]
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("layout", ["contiguous", "broadcast_batch", "offset_rows", "strided_keys", "float64_bias"])
def test_per_key_bias_layouts(layout):
    g = torch.Generator().manual_seed(2)
    q, k, v = qkv(g)
    full = torch.randn(B + 1, 2 * LK, generator=g)
    bias = {
        "contiguous": full[:B, :LK].contiguous(),
        "broadcast_batch": full[:1, :LK],
        "offset_rows": full[1:, :LK],  # a storage offset, row stride 2 * LK
        "strided_keys": full[:B, ::2],  # key stride 2: the glue copies it
        "float64_bias": full[:B, :LK].double(),
    }[layout]
    with torch.no_grad():
        for _ in range(2):
            out = mmkernels.attention(q, k, v, key_bias=bias)
            want = _reference(q, k, v, bias)
            torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)
