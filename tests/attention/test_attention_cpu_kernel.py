"""Quick checks of the C++ CPU attention kernel (torch.ops.mmkernels_C.attention_fwd) against an
inline float64 reference, on every ISA path this CPU can run (forced with MMKERNELS_CPU_ISA).

Tolerance (FlashAttention's 2x rule): fp32 max|err| <= 2 * (err of the same math in fp32 PyTorch)
+ 1e-5; bf16 max|err| <= 2 * (err of the same math in bf16 PyTorch) + 1e-2 * max|ref|; fp16
(widened to fp32 by the kernel) max|err| <= 2 * (err of the same math in fp16 PyTorch) +
1e-3 * max|ref| (about one fp16 ulp).
"""

import math

import pytest
import torch

from backend_params import cpu_isa_paths

cpu = pytest.importorskip("mmkernels.attention.cpu")
if not cpu.is_available():
    pytest.skip(f"mmkernels._C not built: {cpu.LOAD_ERROR}", allow_module_level=True)

ISAS = cpu_isa_paths("attention")  # every ISA path this CPU can run, lowest first
MODES = {"none": 0, "cls": 1, "last": 2, "mean": 3}


def reference(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode, dtype):
    """Plain attention per sequence, computed in `dtype` (float64 for the truth)."""
    Hq, Hkv = q4.shape[1], k4.shape[1]
    Dv = v4.shape[-1]
    out = torch.zeros(q4.shape[0], Hq, q4.shape[2], Dv, dtype=torch.float64)
    lse = torch.full((q4.shape[0], Hq, q4.shape[2]), -math.inf, dtype=torch.float64)
    scores = torch.zeros(q4.shape[0], k4.shape[2], dtype=torch.float64)
    nseq = len(cu_q) - 1 if cu_q is not None else q4.shape[0]
    for b in range(nseq):
        if cu_q is not None:
            bq, q0, q1, k0, k1 = 0, int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        else:
            bq, q0, q1, k0, k1 = b, 0, q4.shape[2], 0, k4.shape[2]
        Lq, Lk = q1 - q0, k1 - k0
        if Lq == 0:
            continue
        q = q4[bq, :, q0:q1].to(dtype)
        k = k4[bq, :, k0:k1].to(dtype).repeat_interleave(Hq // Hkv, 0)
        v = v4[bq, :, k0:k1].to(dtype).repeat_interleave(Hq // Hkv, 0)
        s = (q @ k.transpose(-1, -2)) * scale
        if bias3 is not None:
            bb = bias3[0 if bias3.shape[0] == 1 else bq, :, k0:k1].to(dtype)
            s = s + bb[:, None, :]
        if causal:
            i = torch.arange(Lq)[:, None]
            j = torch.arange(Lk)[None, :]
            s = s.masked_fill(j > i + Lk - Lq, -math.inf)
        m = s.amax(-1, keepdim=True) if Lk else torch.full((Hq, Lq, 1), -math.inf, dtype=dtype)
        m0 = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m0)
        denom = p.sum(-1, keepdim=True)
        pn = torch.where(denom > 0, p / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(p))
        out[bq, :, q0:q1] = (pn.to(dtype) @ v).double()
        lse[bq, :, q0:q1] = (torch.log(denom) + m0).squeeze(-1).double().masked_fill(denom.squeeze(-1) == 0, -math.inf)
        if mode == 1:
            scores[bq, k0:k1] = pn[:, 0].double().mean(0)
        elif mode == 2:
            scores[bq, k0:k1] = pn[:, Lq - 1].double().mean(0)
        elif mode == 3:
            scores[bq, k0:k1] = pn.double().mean(1).mean(0)
    return out, lse, scores


def make(
    B=2, Hq=4, Hkv=None, Lq=33, Lk=None, D=64, Dv=None, dtype=torch.float32, bias=None, varlen=None, blhd=True, seed=0
):
    """Returns (q4, k4, v4, bias3, cu_q, cu_k). varlen = list of (Lq_b, Lk_b)."""
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or Hq
    Lk = Lq if Lk is None else Lk
    Dv = Dv or D

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    cu_q = cu_k = None
    if varlen is not None:
        lq = [a for a, _ in varlen]
        lk = [b for _, b in varlen]
        cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
        cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
        Tq, Tk = int(cu_q[-1]), int(cu_k[-1])
        q4 = rnd(Tq, Hq, D).permute(1, 0, 2)[None]
        k4 = rnd(Tk, Hkv, D).permute(1, 0, 2)[None]
        v4 = rnd(Tk, Hkv, Dv).permute(1, 0, 2)[None]
        Bb, Sk = 1, Tk
    elif blhd:  # the common layout: (B, L, H, D) viewed as (B, H, L, D)
        q4 = rnd(B, Lq, Hq, D).transpose(1, 2)
        k4 = rnd(B, Lk, Hkv, D).transpose(1, 2)
        v4 = rnd(B, Lk, Hkv, Dv).transpose(1, 2)
        Bb, Sk = B, Lk
    else:
        q4, k4, v4 = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, Dv)
        Bb, Sk = B, Lk
    bias3 = None
    if bias == "key":  # per-key bias (padding-style), head stride 0, some -inf
        kb = torch.randn(Bb, Sk, generator=g)
        kb[:, 3::5] = -math.inf
        bias3 = kb[:, None, :].expand(Bb, Hq, Sk)
    elif bias == "pad":  # key padding at the end (trailing -inf keys are skipped by the kernel)
        kb = torch.randn(Bb, Sk, generator=g)
        for b in range(Bb):
            kb[b, Sk - (b + 1) * Sk // 5 :] = -math.inf
        bias3 = kb[:, None, :].expand(Bb, Hq, Sk)
    elif bias == "head":  # per (batch, head, key), one (b, h) entirely -inf
        bias3 = torch.randn(Bb, Hq, Sk, generator=g)
        bias3[..., 1::4] = -math.inf
        bias3[0, 1, :] = -math.inf
    return q4, k4, v4, bias3, cu_q, cu_k


def run_kernel(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode, out_blhd=False):
    Bo, Hq, Sq, Dv = q4.shape[0], q4.shape[1], q4.shape[2], v4.shape[3]
    if out_blhd:
        out4 = torch.full((Bo, Sq, Hq, Dv), float("nan"), dtype=q4.dtype).transpose(1, 2)
    else:
        out4 = torch.full((Bo, Hq, Sq, Dv), float("nan"), dtype=q4.dtype)
    lse3 = torch.full((Bo, Hq, Sq), float("nan"))
    scores2 = torch.full((Bo, k4.shape[2]), float("nan")) if mode else None
    if cu_q is not None:
        mq = int((cu_q[1:] - cu_q[:-1]).max()) if len(cu_q) > 1 else 0
        mk = int((cu_k[1:] - cu_k[:-1]).max()) if len(cu_k) > 1 else 0
    else:
        mq, mk = q4.shape[2], k4.shape[2]
    cpu.attention_forward(q4, k4, v4, bias3, cu_q, cu_k, mq, mk, causal, scale, mode, out4, lse3, scores2)
    return out4, lse3, scores2


def valid_rows(cu_q, Sq):
    """Mask of query rows that belong to some sequence (varlen may leave none out; dense all)."""
    m = torch.zeros(Sq, dtype=torch.bool)
    if cu_q is None:
        m[:] = True
    else:
        m[: int(cu_q[-1])] = True
    return m


def check(case, causal=False, mode=0, out_blhd=False):
    q4, k4, v4, bias3, cu_q, cu_k = case
    scale = 1.0 / math.sqrt(q4.shape[-1])
    out, lse, sc = run_kernel(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode, out_blhd)
    ro, rl, rs = reference(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode, torch.float64)
    low = q4.dtype  # the same math in the input's precision
    lo, ll, ls = reference(q4, k4, v4, bias3, cu_q, cu_k, causal, scale, mode, low)
    rows = valid_rows(cu_q, q4.shape[2])
    out, ro, lo = out[:, :, rows].double(), ro[:, :, rows], lo[:, :, rows].double()
    lse, rl, ll = lse[:, :, rows].double(), rl[:, :, rows], ll[:, :, rows]
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    floor = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}[q4.dtype]
    tol_o = 2 * (lo - ro).abs().max().item() + floor * ro.abs().max().item()
    if q4.dtype == torch.float32:
        tol_o += 1e-5
    err_o = (out - ro).abs().max().item()
    assert err_o <= tol_o, f"out err {err_o:.3g} > tol {tol_o:.3g}"
    # lse: -inf exactly where the reference has -inf
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "lse -inf pattern differs"
    fin = ~torch.isinf(rl)
    if fin.any():
        tol_l = 2 * (ll[fin] - rl[fin]).abs().max().item() + 1e-5 * max(1.0, rl[fin].abs().max().item())
        tol_l += floor
        err_l = (lse[fin] - rl[fin]).abs().max().item()
        assert err_l <= tol_l, f"lse err {err_l:.3g} > tol {tol_l:.3g}"
    if mode:
        assert not torch.isnan(sc).any(), "NaN in scores (a key position was not written)"
        tol_s = 2 * (ls - rs).abs().max().item() + 1e-6
        tol_s += floor * rs.abs().max().item()
        err_s = (sc.double() - rs).abs().max().item()
        assert err_s <= tol_s, f"scores err {err_s:.3g} > tol {tol_s:.3g}"
    return out


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", request.param)
    assert cpu.cpu_isa() == request.param
    return request.param


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["f32", "bf16", "f16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("D", [32, 40, 64, 72, 80, 96, 112, 128, 256])
def test_head_dims(isa, dtype, D):
    check(make(B=1, Hq=2, Lq=37, D=D, dtype=dtype, seed=D))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("L", [1, 7, 197, 257, 321, 577])  # 321, 577: several key blocks
def test_lengths(isa, dtype, L):
    check(make(B=2, Hq=2, Lq=L, D=64, dtype=dtype, seed=L))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_dv_differs_gqa_causal_cross(isa, dtype):
    check(make(B=2, Hq=6, Hkv=2, Lq=45, Lk=70, D=40, Dv=72, dtype=dtype), causal=True)
    check(make(B=1, Hq=6, Hkv=1, Lq=90, Lk=30, D=64, Dv=32, dtype=dtype), causal=True, mode=3)
    check(make(B=2, Hq=4, Hkv=1, Lq=20, Lk=67, D=72, dtype=dtype, blhd=False), mode=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "mode,bias",
    [
        ("cls", "key"),
        ("last", "head"),
        ("mean", None),
        ("mean", "head"),
        ("cls", None),
        ("none", "key"),
        ("mean", "pad"),
        ("last", "pad"),
    ],
)
def test_scores_and_bias(isa, dtype, mode, bias):
    check(make(B=2, Hq=3, Lq=70, Lk=131, D=32, dtype=dtype, bias=bias), mode=MODES[mode])
    check(make(B=1, Hq=4, Hkv=2, Lq=77, D=40, dtype=dtype, bias=bias), causal=True, mode=MODES[mode])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(isa, dtype, causal):
    lens = [(5, 9), (0, 4), (1, 1), (70, 66), (3, 0), (0, 0), (130, 131)]
    for mode in (0, 1, 3):
        check(make(Hq=4, Hkv=2, D=40, dtype=dtype, varlen=lens, bias="head"), causal=causal, mode=mode)
    check(make(Hq=2, D=64, dtype=dtype, varlen=lens), causal=causal, mode=2)


def test_out_strided_and_nan_free(isa):
    check(make(B=2, Hq=3, Lq=50, D=64), out_blhd=True)


def test_forced_isa_unknown(monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="MMKERNELS_CPU_ISA"):
        cpu.cpu_isa()


def test_errors():
    q = torch.randn(1, 2, 8, 64)
    out = torch.empty(1, 2, 8, 64)
    op = torch.ops.mmkernels_C.attention_fwd
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(q.double(), q.double(), q.double(), None, None, None, 8, 8, False, 1.0, 0, out.double(), None, None)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(q.half(), q.half(), q.half(), None, None, None, 8, 8, False, 1.0, 0, out.bfloat16(), None, None)
    with pytest.raises(RuntimeError, match="stride"):
        op(q.transpose(2, 3), q, q, None, None, None, 8, 8, False, 1.0, 0, out, None, None)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        q60 = q[:, :, :, :60].contiguous()
        op(q60, q60, q60, None, None, None, 8, 8, False, 1.0, 0, out[..., :60].contiguous(), None, None)
    with pytest.raises(RuntimeError, match="int32"):
        op(q, q, q, None, torch.tensor([0, 8]), torch.tensor([0, 8]), 8, 8, False, 1.0, 0, out, None, None)


def test_deterministic_scores():
    q4, k4, v4, b, cq, ck = make(B=2, Hq=4, Lq=150, D=64)
    r1 = run_kernel(q4, k4, v4, b, cq, ck, False, 0.125, 3)[2]
    r2 = run_kernel(q4, k4, v4, b, cq, ck, False, 0.125, 3)[2]
    assert torch.equal(r1, r2)


def test_f16_conversions(isa):
    """Every finite fp16 value goes through the kernel's widening and rounding (F16C, or fp16.h on
    the scalar path). With one key the output is V itself (+0 for -0: the accumulator starts at
    +0). With keys (v0, v0, v1) of equal logit it is v0 + (v1 - v0) / 3, nearest to v0, v1 the
    next fp16 value (subnormals included)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    vals = bits.view(torch.float16)
    vals = vals[torch.isfinite(vals)]
    n = vals.numel() // 256 * 256
    v4 = vals[:n].reshape(1, -1, 1, 256)  # B=1, H=n/256, Lk=1, Dv=256
    q4 = torch.zeros(1, v4.shape[1], 1, 8, dtype=torch.float16)

    def run(v):
        k = torch.zeros(1, v.shape[1], v.shape[2], 8, dtype=torch.float16)
        return run_kernel(q4, k, v, None, None, None, False, 1.0, 0)[0].view(torch.int16)

    assert torch.equal(run(v4), (v4 + 0.0).view(torch.int16))
    nxt = v4.roll(-1, -1)  # the next value in bit order (wraps at the row's end: a far value)
    near = (v4.double() - nxt.double()).abs() < 1e-3 * v4.double().abs().clamp_min(1e-4)
    got = run(torch.cat([v4, v4, nxt], 2))
    assert torch.equal(got[near], v4.view(torch.int16)[near])
    if isa == "scalar":  # exp2f(0) == 1 there: the average of two neighbours is an exact tie
        want = ((v4.float() + nxt.float()) * 0.5).half()
        assert torch.equal(run(torch.cat([v4, nxt], 2))[near], want.view(torch.int16)[near])


# Decoding shapes: one (or a few) query rows per head against a long KV cache in its usual
# (B, H, L, D) layout. Such calls pack each key block per item into thread scratch (kJitRows in
# attention.h), and dense single-row GQA calls without scores or per-head bias take a kv head's
# query heads as one item's rows (32:1 is more rows than kJitRows: shared packs).
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("heads", [(9, 3), (8, 8), (32, 1)], ids=["gqa9-3", "mha8", "mqa32"])
@pytest.mark.parametrize("Lk", [17, 333, 1100])
def test_decode(isa, dtype, heads, Lk):
    Hq, Hkv = heads
    for i, bias in enumerate((None, "key", "pad", "head")):
        case = make(B=2, Hq=Hq, Hkv=Hkv, Lq=1, Lk=Lk, D=64, dtype=dtype, bias=bias, blhd=i % 2 == 1, seed=Lk + i)
        check(case, causal=bias == "key", out_blhd=i >= 2)
    check(make(B=1, Hq=Hq, Hkv=Hkv, Lq=1, Lk=Lk, D=72, Dv=40, dtype=dtype, seed=Lk + 5))
    check(make(B=2, Hq=Hq, Hkv=Hkv, Lq=1, Lk=Lk, D=64, dtype=dtype, seed=Lk + 6), mode=MODES["last"])
    check(make(B=2, Hq=Hq, Hkv=Hkv, Lq=1, Lk=Lk, D=64, dtype=dtype, seed=Lk + 7), mode=MODES["mean"])
    # a few rows (speculative decoding, a short prompt): per-block packing without grouping
    check(make(B=1, Hq=4, Hkv=2, Lq=3, Lk=Lk, D=40, dtype=dtype, seed=Lk + 8), causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_decode_varlen(isa, dtype):
    """Continuous batching: every sequence one query row (or none), caches of different lengths."""
    lens = [(1, 700), (1, 33), (0, 5), (1, 1), (1, 0), (1, 321)]
    for mode in (0, 1, 3):
        check(make(Hq=6, Hkv=2, D=40, dtype=dtype, varlen=lens, bias="head"), causal=True, mode=mode)
    check(make(Hq=6, Hkv=3, D=64, dtype=dtype, varlen=lens))
