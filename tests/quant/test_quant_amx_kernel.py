"""The AMX kernels of the CPU qmatmul (csrc/cpu/qmatmul_amx_kernel.h) on what the per-ISA tests
(test_quant_cpu_kernel.py, test_quant_correctness.py, test_quant_nan_semantics.py, which also run
"amx_emulated") leave out: row counts around the 16-row tiles and the 32-row blocks (16, 17, 31,
32, 33, 128), K tails of the int8 tiles (64 features) and bf16 tiles (32 features), several panel
blocks, NaN / inf inside staged K tails and in rows past the last whole tile, and group sizes
only the raw op accepts.

Runs on "amx" where the CPU has it and on "amx_emulated" (every tile instruction emulated in C++,
tile_emu.h) where it runs avx512_bf16; kept small, the emulation is slow. W8A8 must equal the
AVX-512 path and the reference in x's dtype bit for bit (exact int32 sums, same epilogue).
Weight-only (bf16 x: tdpbf16ps) follows the float64 oracle rule of tests/oracle.py; its fp32 group
sums differ from vdpbf16ps only in rounding order, far below the bf16 output rounding. float16 x
never takes the tiles: it must equal the plain "avx512" path (fp32 gemm) bit for bit. conftest
sets MMKERNELS_DEBUG_POISON=1 (outputs start as NaN).
"""

import pytest
import torch

from mmkernels.quant import qmatmul, qmatmul_reference, quantize_weight
from mmkernels.quant import cpu as qcpu

from backend_params import amx_isa_params, cpu_isa_paths
from oracle import FLOOR, max_err

if not qcpu.is_available():
    pytest.skip(f"mmkernels._C has no qmatmul kernels: {qcpu.LOAD_ERROR}", allow_module_level=True)
AMX_ISAS = [p for p in cpu_isa_paths("quant") if p in ("amx", "amx_emulated")]
if not AMX_ISAS:
    pytest.skip("this CPU runs neither amx nor amx_emulated", allow_module_level=True)

TILE_M = (16, 17, 31, 32, 33, 128)
NAN, INF = float("nan"), float("inf")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN on purpose


@pytest.fixture(params=amx_isa_params("quant"))
def isa(request):
    return request.param


@pytest.fixture
def use_isa(monkeypatch):
    """``use_isa(name)``: the cpu backend runs ISA path ``name`` from now on in this test."""

    def use(name):
        monkeypatch.setenv("MMKERNELS_CPU_ISA", name)
        assert qcpu.cpu_isa() == name

    return use


@pytest.fixture
def cpu(use_isa):
    """``cpu(isa, x, qw, ...)``: qmatmul on the cpu backend's ISA path ``isa``."""

    def run(isa, x, qw, bias=None, smooth=None, act_bits=None):
        use_isa(isa)
        return qmatmul(x, qw, bias, act_bits=act_bits, backend="cpu", smooth=smooth)

    return run


def oracle_check(got, x, qw, bias=None):
    exact = qmatmul_reference(x.double(), qw, None if bias is None else bias.double(), None)
    base = max_err(qmatmul_reference(x, qw, bias, None), exact)
    err = max_err(got, exact)
    floor = FLOOR[x.dtype] * max(1.0, exact.abs().max().item())
    assert err <= 2 * base + floor, f"max error {err:.3g} > 2 x {base:.3g} + {floor:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("n,k", [(67, 100), (130, 200), (64, 256)])  # K tails of 36, 8, 0 features
def test_w8a8_tiles_bit_identical(cpu, isa, n, k, symmetric, dtype):
    qw = quantize_weight(torch.randn(n, k), 8, None, symmetric)
    bias, smooth = torch.randn(n), torch.rand(k) + 0.5
    for i, m in enumerate(TILE_M):
        x = (torch.randn(m, k) * 3).to(dtype)
        x[m // 2] = 0  # an all-zero token
        kw = dict(bias=bias if i % 2 else None, smooth=smooth if i % 3 == 1 else None, act_bits=8)
        got = cpu(isa, x, qw, **kw)
        assert not got.isnan().any(), "an output element was not written"
        assert torch.equal(got, cpu("avx512_bf16", x, qw, **kw)), f"M={m}: differs from avx512_bf16"
        want = qmatmul_reference(x, qw, kw["bias"], 8, kw["smooth"])
        assert torch.equal(got, want), f"M={m}: differs from the reference: {max_err(got, want)}"


# (bits, group_size, K): groups of 32 / 64 / 128 (no group straddles a 32-feature tile), per
# channel with K tails of 8 and 4 features, several 512-feature panel blocks with a tail.
WO_CONFIGS = [(4, 32, 160), (4, 64, 192), (8, 64, 128), (4, 128, 1152), (4, None, 200), (8, None, 100), (8, None, 1100)]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size,k", WO_CONFIGS)
def test_weight_only_bf16_tiles(cpu, isa, bits, group_size, k, symmetric):
    n = 67
    qw = quantize_weight(torch.randn(n, k), bits, group_size, symmetric)
    bias = torch.randn(n)
    for i, m in enumerate(TILE_M if k < 1000 else (17, 32)):
        x = torch.randn(m, k).bfloat16()
        b = bias if i % 2 else None
        got = cpu(isa, x, qw, b)
        assert not got.isnan().any(), "an output element was not written"
        oracle_check(got, x, qw, b)


@pytest.mark.parametrize("bits,group_size,k", [(4, 32, 160), (4, None, 200), (8, 64, 128), (8, None, 100)])
def test_weight_only_f16_takes_the_fp32_gemm(cpu, isa, bits, group_size, k):
    """float16 x never reaches a bf16 tile (bf16 would round x): the amx tables widen it to fp32
    and run the AVX-512 fp32 gemm (and rowdot below 16 rows), so their output equals the plain
    "avx512" path's (no bf16 code at all) bit for bit and follows the float64 oracle rule."""
    n = 67
    qw = quantize_weight(torch.randn(n, k), bits, group_size, symmetric=False)
    bias = torch.randn(n)
    for i, m in enumerate((3, 16, 33)):
        x = torch.randn(m, k).half()
        x[m - 1, k - 1] = NAN  # a NaN row, past the whole tiles when m = 33
        b = bias if i % 2 else None
        got = cpu(isa, x, qw, b)
        same = cpu("avx512", x, qw, b)  # raw bits: NaN == NaN
        assert torch.equal(got.view(torch.int16), same.view(torch.int16)), f"M={m}: differs from avx512"
        assert got[m - 1].isnan().all() and not got[: m - 1].isnan().any()
        oracle_check(got[: m - 1], x[: m - 1], qw, b)


@pytest.mark.parametrize("k,gs", [(200, 50), (1056, 48), (1536, 768), (2048, 1024)])
@pytest.mark.parametrize("path", ["amx", "avx512_bf16"])
def test_weight_only_raw_group_sizes(use_isa, isa, path, k, gs):
    """Group sizes the Python API does not make (quantize_weight: 32 / 64 / 128) but the raw op
    accepts (any even divisor of K): groups that straddle bf16 tiles and panel blocks (48, 50) or
    span several blocks (768, 1024); the rows past the last whole tile take the AVX-512 gemm,
    which is also checked alone."""
    n, g = 70, torch.Generator().manual_seed(2)
    u = torch.randint(0, 256, (n, k), generator=g)
    z = torch.randint(0, 256, (n, k // gs), generator=g)
    s = torch.rand(n, k // gs, generator=g) * 0.01
    w_hat = ((u - z.repeat_interleave(gs, 1)) * s.repeat_interleave(gs, 1)).double()
    q, z = u.to(torch.uint8), z.to(torch.uint8)
    ops = qcpu._EXT.require(qcpu.REQUIRED_OP)
    packed = ops.qmatmul_prepack_wo(q, s, z, 8)
    use_isa(isa if path == "amx" else path)
    for m in (16, 19, 32):
        x = torch.randn(m, k, generator=g).bfloat16()
        out = torch.full((m, n), NAN, dtype=torch.bfloat16)
        ops.qmatmul_wo(x, q, s, z, 8, None, None, *packed, out, 0)
        exact = x.double() @ w_hat.T
        base = max_err(exact.bfloat16(), exact)  # the output's rounding to bf16
        err, floor = max_err(out, exact), FLOOR[torch.bfloat16] * exact.abs().max().item()
        assert err <= 2 * base + floor, f"M={m}: max error {err:.3g} > 2 x {base:.3g} + {floor:.3g}"


def test_w8a8_nan_rows_on_tiles(cpu, isa):
    """A NaN / inf inside the staged K tail (features 64..99), in each row tile, in the row past
    the tiles: exactly those output rows are NaN, the others equal the reference bit for bit."""
    n, k, m = 67, 100, 33
    bias = torch.randn(n)
    for symmetric in (True, False):
        qw = quantize_weight(torch.randn(n, k), 8, None, symmetric)
        x = torch.randn(m, k)
        x[3, 98], x[20, 5], x[32, 70] = NAN, INF, -INF
        got = cpu(isa, x, qw, bias, act_bits=8)
        bad = torch.zeros(m, dtype=torch.bool)
        bad[[3, 20, 32]] = True
        assert got.isnan().all(1).equal(bad) and not got[~bad].isnan().any()
        assert torch.equal(got[~bad], qmatmul_reference(x[~bad], qw, bias, 8))


@pytest.mark.parametrize("bits,group_size,k", [(4, None, 200), (8, 32, 160)])
def test_weight_only_nonfinite_on_tiles(cpu, isa, bits, group_size, k):
    """IEEE results of the float64 reference where x holds NaN / inf: in a staged K tail
    (per channel, K = 200: features 192..199), in each row tile, in the row past the tiles; a
    channel of exact zero weights makes 0 * inf = NaN."""
    n, m = 67, 33
    qw = quantize_weight(torch.randn(n, k), bits, group_size, symmetric=False)
    z = qw.zeros[5].repeat_interleave(qw.group_size or k)
    qw.qweight[5] = z[::2] * 17 if bits == 4 else z
    x = torch.randn(m, k).bfloat16()
    x[3, k - 1], x[20, 5], x[32, k - 3] = NAN, INF, -INF
    got = cpu(isa, x, qw)
    exact = qmatmul_reference(x.double(), qw, None, None)
    assert got.isnan().equal(exact.isnan()), "NaN pattern differs from the float64 reference"
    assert got.isinf().equal(exact.isinf()) and torch.equal(got[got.isinf()].double(), exact[exact.isinf()])
    ok = torch.ones(m, dtype=torch.bool)
    ok[[3, 20, 32]] = False
    oracle_check(got[ok], x[ok], qw)
