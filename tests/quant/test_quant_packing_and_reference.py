"""Quantized weight format, RTN quantizer, reference qmatmul (weight-only and W8A8), SQNR."""

import io
import math

import pytest
import torch

from mmkernels.quant import (
    QuantizedWeight,
    pack_int4,
    qmatmul,
    qmatmul_reference,
    quantize_weight,
    smoothquant_factors,
    sqnr,
    unpack_int4,
)
from mmkernels.quant.packing import qrange


# --- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_exhaustive(signed):
    vals = torch.arange(-8, 8) if signed else torch.arange(0, 16)
    lo, hi = torch.meshgrid(vals, vals, indexing="ij")  # all 256 (low, high) pairs
    q = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=1).reshape(1, -1)  # (1, 512)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 256)
    # documented layout: element 2j in the low nibble, 2j+1 in the high nibble, two's complement
    expect = [((int(a) & 0xF) | ((int(b) & 0xF) << 4)) for a, b in q.reshape(-1, 2).tolist()]
    assert packed.reshape(-1).tolist() == expect
    assert sorted(set(expect)) == list(range(256))  # every byte value occurs once
    out = unpack_int4(packed, signed=signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out.to(torch.int64), q.to(torch.int64))


def test_int4_layout_examples():
    assert pack_int4(torch.tensor([[-1, 0]])).item() == 0x0F
    assert pack_int4(torch.tensor([[0, -8]])).item() == 0x80
    assert pack_int4(torch.tensor([[3, 7]])).item() == 0x73
    assert unpack_int4(torch.tensor([[0x9F]], dtype=torch.uint8), signed=True).tolist() == [[-1, -7]]
    assert unpack_int4(torch.tensor([[0x9F]], dtype=torch.uint8), signed=False).tolist() == [[15, 9]]


# --- quantizer vs an independent float64 RTN ----------------------------------------------------


def _rtn64(w, bits, group_size, symmetric):
    """Plain RTN definition in float64 (float64 scales): returns W_hat (N, K) float64."""
    w = w.double()
    n, k = w.shape
    gs = k if group_size is None else group_size
    wg = w.reshape(n, k // gs, gs)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = wg.abs().amax(-1, keepdim=True) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(wg / s), -qmax - 1, qmax)
        return (q * s).reshape(n, k)
    qmax = 2**bits - 1
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.clamp(torch.round(-lo / s), 0, qmax)
    q = torch.clamp(torch.round(wg / s) + z, 0, qmax)
    return ((q - z) * s).reshape(n, k)


CONFIGS = [
    (8, None, True),
    (8, None, False),
    (8, 32, True),
    (8, 128, False),
    (4, None, True),
    (4, 32, True),
    (4, 64, False),
    (4, 128, True),
    (4, 128, False),
]


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_quantize_error_not_worse_than_rtn(bits, group_size, symmetric, wdtype):
    n, k = 37, 256
    w = (torch.randn(n, k) * torch.logspace(-3, 1, n)[:, None]).to(wdtype)
    w[3] = 0  # an all-zero row: no NaN
    w[5, :32] = 0  # an all-zero group
    w[7] = w[7].abs() + 0.1  # all-positive (asym zero point = 0)
    qw = quantize_weight(w, bits, group_size, symmetric)
    ref = _rtn64(w, bits, group_size, symmetric)
    deq = qw.dequantize(torch.float64)
    assert deq.shape == (n, k) and torch.isfinite(deq).all()
    assert torch.equal(deq[3], torch.zeros(k, dtype=torch.float64))
    err = (deq - w.double()).pow(2).sum(1)
    err_ref = (ref - w.double()).pow(2).sum(1)
    # the stored scale is the float32-rounded one: allow float32 rounding of the error, no more
    assert (err <= err_ref * (1 + 1e-5) + 1e-30).all(), (err - err_ref).max()
    # every element within half a step of its group's scale
    gs = k if group_size is None else group_size
    step = qw.scales.double().repeat_interleave(gs, dim=1)
    assert ((deq - w.double()).abs() <= step * (0.5 + 1e-6)).all()
    # stored integers in range, scales float32 positive
    qmin, qmax = qrange(bits, symmetric)
    q = qw.int_weight() if symmetric else qw.int_weight() + qw.zeros.int().repeat_interleave(gs, 1)
    assert q.min() >= qmin and q.max() <= qmax
    assert qw.scales.dtype == torch.float32 and (qw.scales > 0).all()
    assert qw.scales.shape == (n, k // gs)


def test_quantize_buffers_layout():
    w = torch.randn(6, 64)
    for bits, gs, sym, qshape, qdtype in [
        (8, None, True, (6, 64), torch.int8),
        (8, None, False, (6, 64), torch.uint8),
        (4, 32, True, (6, 32), torch.uint8),
        (4, 32, False, (6, 32), torch.uint8),
    ]:
        qw = quantize_weight(w, bits, gs, sym)
        assert qw.qweight.shape == qshape and qw.qweight.dtype == qdtype
        assert qw.scales.shape == (6, 1 if gs is None else 64 // gs)
        assert (qw.zeros is None) == sym
        if not sym:
            assert qw.zeros.dtype == torch.uint8 and qw.zeros.shape == qw.scales.shape
        assert qw.dequantize().shape == (6, 64) and qw.dequantize().dtype == torch.float32
        assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16
        # unpacked int4 values agree with the stored nibbles
        if bits == 4:
            assert torch.equal(
                unpack_int4(qw.qweight, sym).int()[:, 0::2],
                (qw.qweight & 0xF).int() - (16 * ((qw.qweight & 0xF) >= 8).int() if sym else 0),
            )


# --- state dict and devices ----------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 64, False)])
def test_state_dict_roundtrip(bits, group_size, symmetric):
    lin = torch.nn.Module()
    lin.qw = quantize_weight(torch.randn(9, 128), bits, group_size, symmetric)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    back = QuantizedWeight.from_state_dict(sd, prefix="qw.")
    for name in ("qweight", "scales", "zeros", "meta"):
        a, b = getattr(lin.qw, name), getattr(back, name)
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype)
    assert (back.bits, back.group_size, back.shape, back.symmetric) == (bits, group_size, (9, 128), symmetric)
    # load into a pre-built empty module of the same configuration
    target = torch.nn.Module()
    target.qw = QuantizedWeight.empty((9, 128), bits=bits, group_size=group_size, symmetric=symmetric)
    target.load_state_dict(sd, strict=True)
    assert torch.equal(target.qw.dequantize(), lin.qw.dequantize())
    # a mismatched configuration is refused with a clear message
    wrong = torch.nn.Module()
    wrong.qw = QuantizedWeight.empty((9, 128), bits=8, group_size=32, symmetric=symmetric)
    with pytest.raises(RuntimeError, match="meta"):
        wrong.load_state_dict(sd)


def test_device_moves_and_dtype_cast():
    qw = quantize_weight(torch.randn(4, 64), 4, 32, False)
    m = qw.to("meta")
    assert all(t.device.type == "meta" for t in m.buffers())
    qw2 = quantize_weight(torch.randn(4, 64), 8).to(torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in qw2.buffers()) and qw2.device.type == "cpu"
    qw2.to(torch.bfloat16)  # Module.to(dtype) keeps the format
    assert qw2.scales.dtype == torch.float32 and qw2.qweight.dtype == torch.int8


# --- qmatmul reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
@pytest.mark.parametrize(
    "bits,group_size,symmetric", [(8, None, True), (8, None, False), (4, 32, True), (4, 128, False)]
)
def test_qmatmul_weight_only_vs_float64(m, bits, group_size, symmetric):
    n, k = 23, 256  # odd N
    qw = quantize_weight(torch.randn(n, k), bits, group_size, symmetric)
    w64 = qw.dequantize(torch.float64)
    bias = torch.randn(n)
    base = torch.randn(m, 2 * k)
    x = base[:, ::2]  # non-contiguous x
    assert not x.is_contiguous()
    for b in (None, bias):
        want = x.double() @ w64.T + (0 if b is None else b.double())
        y = qmatmul(x, qw, b)
        assert y.shape == (m, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
        y64 = qmatmul(x.double(), qw, None if b is None else b.double())
        torch.testing.assert_close(y64, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(qmatmul_reference(x, qw, b), qmatmul(x, qw, b, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qmatmul_half_inputs_batched(dtype):
    qw = quantize_weight(torch.randn(17, 128), 4, 64, True)
    x = torch.randn(2, 5, 128).to(dtype)
    assert qmatmul(x, qw).shape == (2, 5, 17) and qmatmul(x, qw).dtype == dtype
    bias = torch.randn(17).to(dtype)
    y = qmatmul(x, qw, bias)  # auto-selected: the cpu kernel where built
    # the spec: float32 math, one rounding to the input dtype at the end
    want32 = (x.float() @ qw.dequantize().T + bias.float()).to(dtype)
    torch.testing.assert_close(qmatmul(x, qw, bias, backend="reference"), want32, rtol=0, atol=0)
    # a kernel's float32 sums run in another order: the one rounding may land one unit away
    torch.testing.assert_close(y, want32, rtol=torch.finfo(dtype).eps, atol=1e-6)
    want = x.double() @ qw.dequantize(torch.float64).T + bias.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=2e-2)


def _w8a8_independent(x, w8_int, w8_scale, w8_zero, bias):
    """W8A8 written from the definition with Python-side float64 math and int64 products."""
    x = x.double()
    out = torch.empty(x.shape[0], w8_int.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        amax = x[t].abs().max().item()
        s = amax / 127 if amax > 0 else 1.0
        xq = torch.clamp(torch.round(x[t] / s), -127, 127).long()
        acc = ((w8_int.long() - w8_zero.long()[:, None]) * xq[None, :]).sum(1)
        out[t] = acc.double() * s * w8_scale.double() + (0 if bias is None else bias.double())
    return out


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 33])
def test_w8a8_vs_independent(symmetric, m):
    n, k = 19, 192
    w = torch.randn(n, k)
    qw = quantize_weight(w, 8, None, symmetric)
    w_int = qw.qweight.long()
    zero = torch.zeros(n, dtype=torch.long) if symmetric else qw.zeros[:, 0].long()
    x = torch.randn(m, k) * 3
    x[0] = 0 if m > 1 else x[0]  # an all-zero token
    bias = torch.randn(n)
    want = _w8a8_independent(x, w_int, qw.scales[:, 0], zero, bias)
    y64 = qmatmul(x.double(), qw, bias.double(), act_bits=8)
    torch.testing.assert_close(y64, want, rtol=1e-12, atol=1e-12)
    y32 = qmatmul(x, qw, bias, act_bits=8)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), want, rtol=1e-4, atol=1e-3)
    # quality: W8A8 output within ~35 dB of the float output for Gaussian data
    assert sqnr(x.double() @ w.double().T + bias.double(), y32) > 30


def test_smooth_equivalence():
    n, k = 11, 128
    w = torch.randn(n, k, dtype=torch.float64)
    x = torch.randn(7, k, dtype=torch.float64) * torch.linspace(0.1, 20, k, dtype=torch.float64)
    s = smoothquant_factors(x.abs().amax(0), w, alpha=0.5)
    assert s.shape == (k,) and (s > 0).all()
    qw = quantize_weight(w * s.double()[None, :], 8)
    y = qmatmul(x, qw, smooth=s)
    want = (x / s.double()) @ qw.dequantize(torch.float64).T
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert sqnr(x @ w.T, y) > 35
    assert sqnr(x @ w.T, qmatmul(x, qw, act_bits=8, smooth=s)) > 25


def test_torch_compile_fullgraph():
    qw = quantize_weight(torch.randn(13, 64), 4, 32, False)
    bias = torch.randn(13)
    x = torch.randn(5, 64)
    fn = torch.compile(lambda x: qmatmul(x, qw, bias), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), qmatmul(x, qw, bias))
    torch.library.opcheck(
        torch.ops.mmkernels.qmatmul.default, (x, qw.qweight, qw.scales, qw.zeros, bias, None, 4, 0, "", "gelu")
    )


# --- SQNR ------------------------------------------------------------------------------------------


def test_sqnr():
    ref = torch.ones(100, dtype=torch.float64)
    assert sqnr(ref, ref) == math.inf
    assert abs(sqnr(ref, ref * 1.1) - 20.0) < 1e-9  # noise 0.1 -> 20 dB
    assert abs(sqnr(ref, ref + 0.01) - 40.0) < 1e-9
    assert sqnr(torch.zeros(3), torch.ones(3)) == -math.inf
    w = torch.randn(64, 256)
    s8, s4 = (sqnr(w, quantize_weight(w, b, g).dequantize()) for b, g in ((8, None), (4, 32)))
    assert s8 > 35 and 15 < s4 < s8
    with pytest.raises(ValueError, match="shape"):
        sqnr(torch.ones(3), torch.ones(4))
