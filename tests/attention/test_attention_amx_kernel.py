"""The AMX attention kernel (csrc/cpu/attention_amx_kernel.h) on the real tiles where the CPU has
AMX ("amx"; a skipped param saying why elsewhere) and over emulated tiles everywhere AVX-512 BF16
runs (MMKERNELS_CPU_ISA=amx_emulated, csrc/cpu/tile_emu.h), on what the per-ISA tests of
test_attention_cpu_kernel.py / test_attention_nan_semantics.py do not already reach on that path:
several key blocks (Lk > 320, a merged tail that is not a multiple of 32 keys), head dims padded to
32 (8, 24, 72, 80, 96), query and key counts that are not multiples of 16 / 32 (Lq != Lk), GQA,
varlen, key_bias with -inf entries and trailing padding, every score mode, lse, inputs that are
strided views of a packed qkv tensor, and NaN / inf in V past the first block.

Oracle: the float64 reference (mmkernels.reference_attention). Tolerance: max|err| <= 2 * (error of
the same reference computed in bfloat16) + 1e-2 * max|ref| (the bf16 rule of
test_attention_cpu_kernel.py). conftest sets MMKERNELS_DEBUG_POISON=1: the outputs start as NaN.
The emulated tiles are slow: the shapes are kept small.
"""

import pytest
import torch

import mmkernels
from backend_params import amx_isa_params, cpu_isa_paths

cpu = pytest.importorskip("mmkernels.attention.cpu")
if not cpu.is_available():
    pytest.skip(f"mmkernels._C not built: {cpu.LOAD_ERROR}", allow_module_level=True)
if "amx_emulated" not in cpu_isa_paths("attention"):
    pytest.skip("this CPU cannot run amx_emulated (needs AVX-512 BF16 and VNNI)", allow_module_level=True)

NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True, params=amx_isa_params("attention"))
def amx_path(request, monkeypatch):
    """Every test on the real tiles ("amx", where the CPU has them) and the emulated ones."""
    monkeypatch.setenv("MMKERNELS_CPU_ISA", request.param)
    assert cpu.cpu_isa() == request.param
    return request.param


def rand(g, *shape):
    return torch.randn(*shape, generator=g).bfloat16()


def check(q, k, v, *, scores=None, **kw):
    """Runs the cpu backend on bf16 inputs and compares out, lse (and scores) with the float64
    reference; returns the result."""
    got = mmkernels.attention(q, k, v, scores=scores, return_lse=True, backend="cpu", **kw)
    kw64 = {n: (t.double() if n == "key_bias" and t is not None else t) for n, t in kw.items()}
    want = mmkernels.reference_attention(q.double(), k.double(), v.double(), scores=scores, **kw64)
    low = mmkernels.reference_attention(q, k, v, scores=scores, **kw)
    names = ["out", "lse", "scores"] if scores else ["out", "lse"]
    results = [got.out, got.lse, got.scores]
    for name, g_, w, lo in zip(names, results, want, low):
        g_, w, lo = g_.double(), w.double(), lo.double()
        fin = torch.isfinite(w)
        # -inf (lse of a fully masked row) exactly where the reference has it, and nothing unwritten
        assert torch.equal(g_[~fin], w[~fin]), f"{name}: non-finite pattern differs"
        assert torch.isfinite(g_[fin]).all(), f"{name}: NaN / inf where the reference is finite"
        if not fin.any():
            continue
        floor = 1e-2 * w[fin].abs().max().item()
        if name == "lse":
            floor = max(floor, 1e-2)
        tol = 2 * (lo[fin] - w[fin]).abs().max().item() + floor
        err = (g_[fin] - w[fin]).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3g} > tol {tol:.3g}"
    return got


@pytest.mark.parametrize(
    "d,dv,lq,lk",
    [
        (64, 64, 17, 197),  # ragged rows and keys, one block
        (72, 72, 197, 257),  # D padded 72 -> 96, Dvp 80: 2 + 2 + 1 column tiles
        (80, 80, 1, 33),  # one query row, 33 keys: P padded to 64
        (96, 96, 33, 577),  # several key blocks, merged tail of 65 keys
        (128, 128, 257, 17),  # more queries than keys
        (8, 24, 17, 45),  # the smallest head dim (padded to 32), Dv != D
        (24, 8, 50, 31),
    ],
)
def test_head_dims_and_ragged_lengths(d, dv, lq, lk):
    g = torch.Generator().manual_seed(d * 1000 + lk)
    q, k, v = rand(g, 1, 2, lq, d), rand(g, 1, 2, lk, d), rand(g, 1, 2, lk, dv)
    check(q, k, v)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scores", ["cls", "last", "mean"])
def test_multi_block_gqa_bias_scores(causal, scores):
    """Lk = 577 (8 blocks of 64 and a tail of 65), GQA 4:2, a per-key bias with -inf holes and
    trailing padding (batch 1), every score mode (the kept-probability path)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = rand(g, 2, 4, 70, 72), rand(g, 2, 2, 577, 72), rand(g, 2, 2, 577, 72)
    bias = torch.randn(2, 577, generator=g)
    bias[:, 3::7] = -INF
    bias[1, 500:] = -INF
    check(q, k, v, key_bias=bias, causal=causal, scores=scores)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_and_fully_masked(causal):
    """Packed sequences of ragged lengths (one of them several blocks long, one empty, one without
    keys), a per-head bias that masks a whole head of one sequence: out 0 and lse -inf there."""
    g = torch.Generator().manual_seed(11)
    lens = [(17, 401), (0, 5), (33, 1), (5, 0), (130, 97)]
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(b for _, b in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = rand(g, tq, 4, 40), rand(g, tk, 2, 40), rand(g, tk, 2, 56)
    bias = torch.randn(tk, 4, generator=g)
    bias[1::5] = -INF
    bias[406:407, 1] = -INF  # sequence 2's only key, head 1: its rows are fully masked
    got = check(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, key_bias=bias, causal=causal, scores="mean")
    assert (got.out[17:50, 1] == 0).all() and (got.lse[17:50, 1] == -INF).all()


def test_strided_views_of_packed_qkv():
    """q, k, v as views of one (B, L, 3, H, D) tensor (rows 3 * H * D apart), Lq = Lk = 197."""
    g = torch.Generator().manual_seed(13)
    qkv = rand(g, 2, 197, 3, 3, 64)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check(q, k, v, scores="cls")


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_value_past_the_first_block(value):
    """A NaN / inf in V at key 520 (the merged tail block) with D padded (72): out[i, c] NaN for
    the rows that see the key (causal: rows >= 520 - (Lk - Lq)), the rest as the reference on the
    cleaned inputs (the rerun on a sanitised V pack)."""
    g = torch.Generator().manual_seed(17)
    lq, lk = 40, 577
    q, k, v = rand(g, 1, 2, lq, 72), rand(g, 1, 1, lk, 72), rand(g, 1, 1, lk, 72)
    v[0, 0, 520, 5] = value
    got = mmkernels.attention(q, k, v, causal=True, return_lse=True, backend="cpu")
    seen = torch.arange(lq) + (lk - lq) >= 520
    want_nan = torch.zeros(1, 2, lq, 72, dtype=torch.bool)
    want_nan[0, :, seen, 5] = True
    assert torch.equal(got.out.isnan(), want_nan)
    assert torch.isfinite(got.lse).all()
    vc = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    ref = mmkernels.reference_attention(q.double(), k.double(), vc.double(), causal=True)[0]
    err = (got.out.double()[~want_nan] - ref[~want_nan]).abs().max().item()
    assert err <= 3e-2 * max(1.0, ref.abs().max().item())
