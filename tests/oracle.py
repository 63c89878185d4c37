"""The float64 oracle and the tolerance rule shared by the tests.

Rule: a backend's max abs error to the float64 oracle may be at most 2x the error of the same
computation done by PyTorch in the input precision, plus a small floor.
"""

import torch

import mmkernels
from mmkernels import _dispatch

FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4, torch.float64: 1e-10}


def _up(t, dtype=torch.float64):
    return None if t is None else t.to(dtype)


def oracle(
    q,
    k,
    v,
    *,
    dtype=torch.float64,
    key_bias=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    causal=False,
    scale=None,
    scores=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
):
    """Reference (out, lse, scores) computed with every input cast to ``dtype``."""
    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    res = mmkernels.reference_attention(
        _up(q, dtype),
        _up(k, dtype),
        _up(v, dtype),
        key_bias=_up(key_bias, bias_dtype),
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        causal=causal,
        scale=scale,
        scores=scores or "mean",
    )
    return res


def max_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(both_inf, 0, (a - b).abs())
    diff = torch.where(torch.isnan(diff), float("inf"), diff)
    return diff.max().item() if diff.numel() else 0.0


def _serves(backend, feature: str) -> bool:
    """Whether ``backend`` declares that it serves attention's ``feature`` (mmkernels._dispatch)."""
    for b in _dispatch.backends_for("attention"):
        if b.name == getattr(backend, "name", backend):
            return b.features is None or feature in b.features
    return True


def assert_matches_oracle(q, k, v, backend, **kw):
    """Run mmkernels.attention with ``backend`` and check out, lse and scores against the oracle.
    Scores are asked for (``"mean"``) unless the test says otherwise or the backend declares it
    forms none (the torch backend: SDPA); ``scores=None`` checks out and lse only."""
    scores = kw.pop("scores", "mean" if _serves(backend, "scores") else None)
    result = mmkernels.attention(q, k, v, scores=scores, return_lse=True, backend=backend, **kw)
    exact = oracle(q, k, v, scores=scores, **kw)
    same_precision = oracle(q, k, v, dtype=q.dtype, scores=scores, **kw)
    floor = FLOOR[q.dtype]
    checks = [
        ("out", result.out, exact[0], same_precision[0], floor),
        ("lse", result.lse, exact[1], same_precision[1], max(floor, 1e-5)),
        ("scores", result.scores, exact[2], same_precision[2], max(floor * 0.1, 2e-6)),
    ]
    if scores is None:
        checks.pop()
    for name, got, want, torch_same, fl in checks:
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert not torch.isnan(got).any(), f"{name}: NaN in output (unwritten or 0/0)"
        err, base = max_err(got, want), max_err(torch_same, want)
        assert err <= 2 * base + fl, f"{name}: max error {err:.3g} > 2 x {base:.3g} (PyTorch {q.dtype}) + {fl}"
    assert result.out.dtype == q.dtype
    return result
