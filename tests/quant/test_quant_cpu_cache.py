"""mmkernels.clear_caches(): the CPU qmatmul backend's prepacked-weight cache cannot see writes
that bypass the autograd version counter (``.numpy()``); clear_caches() drops it."""

import pytest
import torch

import mmkernels
from mmkernels.nn import QuantLinear
from mmkernels.quant import cpu

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"CPU qmatmul backend unavailable: {cpu.LOAD_ERROR}")


@pytest.mark.parametrize(
    "kw", [dict(bits=8), dict(bits=4, group_size=32), dict(bits=8, act_bits=8)], ids=["int8", "int4-g32", "w8a8"]
)
def test_clear_caches_after_numpy_write(kw):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = QuantLinear.from_linear(lin, backend="cpu", **kw)
    x = torch.randn(cpu.GEMM_MIN_M * 2, 64)  # enough rows for the prepacked path
    before = layer(x)
    assert cpu.cache_size() >= 1
    qweight = layer.quantized.qweight
    version = qweight._version
    arr = qweight.numpy()
    arr[:] = arr[::-1].copy()  # reverse the output channels in place
    assert qweight._version == version  # invisible to the version counter
    oracle = QuantLinear.from_linear(lin, backend="reference", **kw)
    oracle.load_state_dict(layer.state_dict())
    want = oracle(x)
    assert not torch.allclose(want, before)  # the write changes the result
    mmkernels.clear_caches()
    assert cpu.cache_size() == 0
    torch.testing.assert_close(layer(x), want)


def test_clear_caches_is_public_and_documented():
    assert "clear_caches" in mmkernels.__all__
    assert ".numpy()" in mmkernels.clear_caches.__doc__
    import mmkernels.nn.quant_linear as ql

    assert "mmkernels.clear_caches()" in ql.__doc__


def test_an_entry_dies_with_its_weight_and_in_place_changes_rebuild_it():
    import gc
    import weakref

    mmkernels.clear_caches()
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    layer = QuantLinear.from_linear(lin, backend="cpu", bits=8, act_bits=8)
    x = torch.randn(5, 64)
    layer(x)
    qweight = layer.quantized.qweight
    assert cpu.is_cached(qweight) and cpu.cache_size() == 1
    # an in-place torch op bumps the version counter: the next call repacks the new weight
    oracle = QuantLinear.from_linear(lin, backend="reference", bits=8, act_bits=8)
    with torch.no_grad():
        qweight.copy_(qweight.flip(0))
        oracle.quantized.qweight.copy_(oracle.quantized.qweight.flip(0))
    torch.testing.assert_close(layer(x), oracle(x))
    alive = weakref.ref(qweight)
    del layer, qweight
    gc.collect()
    assert alive() is None and cpu.cache_size() == 0


def test_a_slot_is_never_read_for_another_tensor():
    """The cache is keyed by id(qweight); a dead tensor's id can be reused by a new one before the
    slot's callback runs: a hit needs the slot's weak reference to point at the very tensor."""
    import weakref

    from mmkernels import _packed_cache

    a, b = torch.zeros(4, 4, dtype=torch.int8), torch.zeros(4, 4, dtype=torch.int8)
    _packed_cache._CACHE[id(b)] = (weakref.ref(a), {"a8": "stale"})
    try:
        assert not cpu.is_cached(b)
        assert _packed_cache._entries(b) is None
    finally:
        _packed_cache._CACHE.pop(id(b), None)
