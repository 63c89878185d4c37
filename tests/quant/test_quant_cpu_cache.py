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
