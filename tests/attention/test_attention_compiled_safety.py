"""Malformed cu_seqlens under torch.compile: the public argument checks cannot read tensor values
while tracing, so the custom op checks them at execution time (CPU tensors), and the Triton
kernels keep every access inside the tensors (GPU tensors are not read on the host).
"""

import os

import pytest
import torch

import mmkernels

T, H, D = 12, 2, 16
GOOD = [0, 5, 12]
# (cu_seqlens_q, max_seqlen_q, the message the error must carry)
BAD = [
    ([0, 5, 14], 7, "cu_seqlens_q[-1] must equal the number of packed tokens (12), got 14"),
    ([0, 5, 11], 7, "cu_seqlens_q[-1] must equal the number of packed tokens (12), got 11"),
    ([1, 5, 12], 7, "cu_seqlens_q must start at 0, got 1"),
    ([0, 7, 5], 7, "cu_seqlens_q must be non-decreasing"),
    ([0, 9, 12], 7, "max_seqlen_q=7 is smaller than the longest sequence in cu_seqlens_q (9)"),
]


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(T, H, D, generator=g) for _ in range(3))


def _compiled(backend, compiler):
    torch._dynamo.reset()

    def f(q, k, v, cu_q, cu_k, max_q):
        return mmkernels.attention(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=7, backend=backend
        )

    return f, torch.compile(f, fullgraph=True, backend=compiler)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_varlen_refuses_bad_cu_seqlens(backend, compiler):
    ok, why = next(
        (b.availability() for b in mmkernels._dispatch.backends_for("attention") if b.name == backend),
        (False, "not registered"),
    )
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    q, k, v = _qkv()
    eager, compiled = _compiled(backend, compiler)
    good = torch.tensor(GOOD, dtype=torch.int32)
    torch.testing.assert_close(compiled(q, k, v, good, good, 7), eager(q, k, v, good, good, 7))
    for cu_q, max_q, message in BAD:
        cu = torch.tensor(cu_q, dtype=torch.int32)
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            compiled(q, k, v, cu, good, max_q)
    # the same on the key side
    with pytest.raises(Exception, match=r"cu_seqlens_k\[-1\] must equal .* \(12\), got 13"):
        compiled(q, k, v, good, torch.tensor([0, 5, 13], dtype=torch.int32), 7)
    with pytest.raises(Exception, match=r"max_seqlen_k=7 is smaller .* cu_seqlens_k \(8\)"):
        compiled(q, k, v, good, torch.tensor([0, 4, 12], dtype=torch.int32), 7)


def test_op_called_directly_checks_values():
    """torch.ops.mmkernels.attention (what a compiled graph or an engine calls) checks too."""
    q, k, v = _qkv()
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    good = torch.tensor(GOOD, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] must equal"):
        torch.ops.mmkernels.attention(q, k, v, None, cu, good, 7, 7, False, 0.25, 0, False, "reference")
    with pytest.raises(ValueError, match="given together"):
        torch.ops.mmkernels.attention(q, k, v, None, good, None, 7, 7, False, 0.25, 0, False, "reference")


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU): no access outside the tensors
# ----------------------------------------------------------------------------------------------


def _guarded(shape, fill, pad=6):
    """A (1, H, S, Dx) canonical view into the middle of a bigger buffer along S, the rest of
    which holds ``fill``: a read or write past the view's rows touches the guard rows."""
    one, h, s, d = shape
    buf = torch.full((s + 2 * pad, one, h, d), fill)
    return buf, buf[pad : pad + s].permute(1, 2, 0, 3)


@pytest.mark.parametrize(
    "cu_q, cu_k",
    [
        ([0, 4, 14], [0, 4, 10]),  # q's last sequence runs past the packed rows
        ([0, 4, 10], [0, 4, 15]),  # k's last sequence runs past the packed keys
        ([-3, 4, 10], [0, 7, 4]),  # negative start, decreasing k
    ],
)
def test_triton_kernels_stay_inside_the_tensors(cu_q, cu_k):
    tri = pytest.importorskip("mmkernels.attention.triton")
    if os.environ.get("TRITON_INTERPRET") != "1" or not tri.is_available()[0]:
        pytest.skip("needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    sq = sk = 10
    g = torch.Generator().manual_seed(1)
    nan = float("nan")
    qbuf, q4 = _guarded((1, H, sq, D), nan)  # NaN guard rows: a read past the end shows
    kbuf, k4 = _guarded((1, H, sk, D), nan)
    vbuf, v4 = _guarded((1, H, sk, D), nan)
    for t in (q4, k4, v4):
        t.copy_(torch.randn(t.shape, generator=g))
    obuf, out4 = _guarded((1, H, sq, D), 7.0)  # sentinel guard rows: a write past the end shows
    lbuf = torch.full((sq + 12, H), 7.0)
    lse3 = lbuf[6 : 6 + sq].t()[None]
    sbuf = torch.full((sk + 12,), 7.0)
    scores2 = sbuf[6 : 6 + sk][None]
    cq, ck = (torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_k))
    tri.attention_forward(q4, k4, v4, None, cq, ck, 16, 16, False, D**-0.5, 3, out4, lse3, scores2)
    for name, buf, lo, hi in (("out", obuf, 6, 6 + sq), ("lse", lbuf, 6, 6 + sq), ("scores", sbuf, 6, 6 + sk)):
        guard = torch.cat([buf[:lo].reshape(-1), buf[hi:].reshape(-1)])
        assert torch.all(guard == 7.0), f"{name}: a write landed outside the tensor"
    assert not torch.isnan(out4).any(), "a read past the tensor's rows reached the output"
    assert not torch.isnan(scores2).any()
