"""The torch backend's NaN / inf pre-check, ``mmkernels_C::attention_any_nonfinite`` (csrc/cpu/
attention.cpp), on every ISA path this CPU can run: it finds one non-finite value anywhere in any
layout (strided views, slices of a fused projection, broadcast dims, the threaded path of large
tensors), never flags a finite value (the largest, subnormals, -0) and never reads an element
outside the view (NaN planted in the gaps between its rows and beside it goes unseen)."""

import pytest
import torch

from backend_params import cpu_isa_paths
from mmkernels.attention import cpu

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"extension not built: {cpu.LOAD_ERROR}")

ISAS = cpu_isa_paths("attention") if cpu.is_available() else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["f32", "bf16", "f16"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("MMKERNELS_CPU_ISA", request.param)
    return request.param


def scan(*tensors) -> bool:
    return torch.ops.mmkernels_C.attention_any_nonfinite(list(tensors))


def extremes(dtype):
    """Finite values at the edges: the largest, the smallest normal and a subnormal, and -0."""
    info = torch.finfo(dtype)
    return torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0], dtype=torch.float32).to(dtype)


def views(g, dtype):
    """Views as the torch backend gets them, each with the tensor it views (whose other elements
    are NaN: a scan that strays outside the view finds them)."""
    out = {}
    fused = torch.full((2, 37, 3, 5, 24), float("nan"), dtype=dtype)  # (B, L, qkv, H, D)
    fused[:, :, 1] = torch.randn(2, 37, 5, 24, generator=g).to(dtype)
    out["fused_projection_slice"] = (fused[:, :, 1].transpose(1, 2), fused)  # (B, H, L, D)
    wide = torch.full((3, 11, 40), float("nan"), dtype=dtype)
    wide[:, :, 3:35] = torch.randn(3, 11, 32, generator=g).to(dtype)
    out["rows_with_gaps"] = (wide[:, :, 3:35], wide)
    flat = torch.full((4 * 9 * 16 + 2,), float("nan"), dtype=dtype)
    flat[1:-1] = torch.randn(4 * 9 * 16, generator=g).to(dtype)
    out["storage_offset"] = (flat[1:-1].view(4, 9, 16), flat)
    cache = torch.full((2, 64, 4, 16), float("nan"), dtype=dtype)  # a KV cache, 40 of 64 rows used
    cache[:, :40] = torch.randn(2, 40, 4, 16, generator=g).to(dtype)
    out["cache_prefix"] = (cache[:, :40].transpose(1, 2), cache)
    fused = torch.full((3, 37, 3, 5, 24), float("nan"), dtype=dtype)  # rows, and sequences apart
    fused[:, :30, 1] = torch.randn(3, 30, 5, 24, generator=g).to(dtype)
    out["fused_projection_prefix"] = (fused[:, :30, 1].transpose(1, 2), fused)
    wide = torch.full((4, 5, 9, 40), float("nan"), dtype=dtype)  # three levels of gaps
    wide[:, :3, :7, 2:34] = torch.randn(4, 3, 7, 32, generator=g).to(dtype)
    out["nested_gaps"] = (wide[:, :3, :7, 2:34], wide)
    base = torch.randn(2, 1, 50, 16, generator=g).to(dtype)
    out["broadcast_heads"] = (base.expand(2, 8, 50, 16), base)
    base = torch.randn(16, 50, generator=g).to(dtype)
    out["last_dim_strided"] = (base.t(), base)  # no dim of stride 1
    windows = torch.full((80,), float("nan"), dtype=dtype)  # overlapping rows: 10 windows of 20
    windows[:65] = torch.randn(65, generator=g).to(dtype)
    out["overlapping_windows"] = (windows.as_strided((10, 20), (5, 1)), windows)
    big = torch.randn(3, 300, 4, 128, generator=g).to(dtype)  # 460800 elements: several threads
    out["large"] = (big.transpose(1, 2), big)
    out["one_element"] = (torch.randn(1, 1, 1, 1, generator=g).to(dtype),) * 2
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_finite_tensors_pass(isa, dtype):
    g = torch.Generator().manual_seed(0)
    for name, (view, _) in views(g, dtype).items():
        assert not scan(view), name
    assert not scan(extremes(dtype))
    assert not scan(torch.empty(0, 3, dtype=dtype), torch.empty(2, 0, 5, dtype=dtype))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_one_nonfinite_value_anywhere_is_found(isa, dtype, value):
    g = torch.Generator().manual_seed(1)
    for name, (view, _) in views(g, dtype).items():
        flat_index = torch.randperm(view.numel(), generator=g)[:3].tolist() + [0, view.numel() - 1]
        for i in flat_index:
            index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), view.shape))
            old = view[index].clone()
            view[index] = value  # in place: the NaN around the view stays where it was
            assert scan(view), f"{name}: {value} at {index}"
            view[index] = old
            assert not scan(view), name


@pytest.mark.parametrize("layout", ["contiguous", "rows_apart"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])  # f16: bf16's code
def test_large_tensors_are_read_whole(isa, dtype, layout):
    """Large tensors are split into units of work for threads: a NaN next to every multiple of
    1024 elements (where any such split falls) and at random places is found."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(3, 300, 4, 128 if layout == "contiguous" else 136, generator=g).to(dtype)
    view = big[..., :128].transpose(1, 2)  # (B, H, L, D); rows_apart: 8 unread elements per row
    flat = big[..., :128].reshape(-1) if layout == "contiguous" else None
    assert not scan(view)
    n = 3 * 300 * 4 * 128
    places = sorted({p for k in range(0, n + 1, 1024) for p in (k - 1, k) if 0 <= p < n})
    places += torch.randint(0, n, (200,), generator=g).tolist()
    for p in places:
        index = torch.unravel_index(torch.tensor(p), (3, 300, 4, 128))
        index = tuple(int(j) for j in index)
        old = big[index].clone()
        big[index] = float("nan")
        assert scan(view), f"NaN at {index}"
        big[index] = old
    assert flat is None or not scan(flat)


def test_several_tensors_and_errors():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 8, generator=g), torch.randn(3, 16, generator=g).bfloat16()
    assert not scan(a, b)
    b[2, 15] = float("nan")
    assert scan(a, b)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be float32, bfloat16 or float16"):
        scan(a, a.double())
    with pytest.raises(RuntimeError, match=r"at most 8 dims"):
        scan(torch.randn([1] * 9))


@pytest.mark.parametrize("with_extension", [True, False], ids=["scan", "sums"])
def test_torch_backend_precheck(monkeypatch, with_extension):
    """sdpa._all_finite: the scan, or float32 sums where the extension is not built."""
    from mmkernels.attention import sdpa

    if not with_extension:
        monkeypatch.setattr(sdpa._EXT, "ops", lambda required: None)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 7, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    assert sdpa._all_finite(q, k, v)
    for t, value in ((q, float("nan")), (k, float("inf")), (v, float("-inf"))):
        old = t[1, 2, 6, 15].clone()
        t[1, 2, 6, 15] = value
        assert not sdpa._all_finite(q, k, v)
        t[1, 2, 6, 15] = old
