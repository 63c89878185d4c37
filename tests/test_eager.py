"""The eager fast path (mmkernels._eager.plain_eager): plain eager inference skips the custom ops'
dispatch, and every situation in which PyTorch must see the op still goes through it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmkernels
from mmkernels._eager import plain_eager
from mmkernels.attention import api as attention_api
from mmkernels.quant import api as quant_api
from mmkernels.reduce import api as reduce_api


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _qkv(g, b=2, h=3, lq=9, lk=11, d=16):
    return [torch.randn(b, n, h, d, generator=g).transpose(1, 2) for n in (lq, lk, lk)]


def test_predicate_plain_tensors_only():
    x = torch.randn(3, 4)
    assert plain_eager(x, None)
    leaf = torch.randn(3, requires_grad=True)
    assert not plain_eager(x, leaf)
    with torch.no_grad():
        assert plain_eager(x, leaf)
    with torch.inference_mode():
        assert plain_eager(x)
    # a layer's weight: its torch function is disabled, ops see a plain tensor
    assert plain_eager(torch.nn.Parameter(torch.randn(2), requires_grad=False))
    assert not plain_eager(torch.nn.Parameter(torch.randn(2)))  # a gradient to record
    with torch.no_grad():
        assert plain_eager(torch.nn.Parameter(torch.randn(2)))

    class MyParameter(torch.nn.Parameter):
        pass

    assert not plain_eager(MyParameter(torch.randn(2), requires_grad=False))  # other subclasses
    assert not plain_eager(torch.nn.parameter.UninitializedParameter(requires_grad=False))


@pytest.mark.parametrize(
    "context",
    ["device", "dispatch_mode", "profiler", "fake"],
)
def test_predicate_refuses_modes(context):
    x = torch.randn(3, 4)
    if context == "device":
        with torch.device("cpu"):  # a TorchFunctionMode
            assert not plain_eager(x)
    elif context == "dispatch_mode":
        with RecordOps():
            assert not plain_eager(x)
    elif context == "profiler":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            assert not plain_eager(x)
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            fake = torch.empty(3)
        assert not plain_eager(fake)
    assert plain_eager(x)


def test_predicate_refuses_functorch_transforms():
    seen = []

    def f(t):
        seen.append(plain_eager(t))
        return t * 2

    torch.vmap(f)(torch.randn(3, 4))
    torch.func.grad(lambda t: f(t).sum())(torch.randn(3))
    assert seen == [False, False]


def test_attention_fast_path_skips_the_op(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(g)
    bias = torch.randn(2, 11, generator=g)
    with torch.no_grad():
        through_op = attention_api._attention_op(q, k, v, bias, None, None, 9, 11, False, 0.25, 3, True, "")

    def refuse(*args, **kwargs):
        raise AssertionError("plain eager inference must not dispatch through the custom op")

    monkeypatch.setattr(attention_api, "_attention_op", refuse)
    with torch.no_grad():
        fast = mmkernels.attention(q, k, v, key_bias=bias, scale=0.25, scores="mean", return_lse=True)
    assert torch.equal(fast.out, through_op[0])
    assert torch.equal(fast.lse, through_op[1])
    assert torch.equal(fast.scores, through_op[2])
    assert fast.out.transpose(1, 2).is_contiguous()


def test_each_family_goes_through_its_op_under_a_dispatch_mode():
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv(g)
    qw = mmkernels.quantize_weight(torch.randn(24, 32, generator=g), bits=8)
    x = torch.randn(5, 32, generator=g)
    metric = torch.randn(2, 17, 8, generator=g)
    with torch.no_grad():
        expected = (
            mmkernels.attention(q, k, v),
            mmkernels.qmatmul(x, qw, act_bits=8),
            mmkernels.tome_plan(metric, 4),
        )
        with RecordOps() as mode:
            got = (
                mmkernels.attention(q, k, v),
                mmkernels.qmatmul(x, qw, act_bits=8),
                mmkernels.tome_plan(metric, 4),
            )
    for name in ("mmkernels.attention.default", "mmkernels.qmatmul.default", "mmkernels.tome_plan.default"):
        assert name in mode.names
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2]))


def test_gradients_still_flow_through_the_op():
    g = torch.Generator().manual_seed(2)
    q, k, v = (t.detach().requires_grad_(True) for t in _qkv(g, lq=5, lk=6, d=8))
    mmkernels.attention(q, k, v).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_quant_and_reduce_share_the_predicate():
    assert quant_api.plain_eager is plain_eager
    assert reduce_api.plain_eager is plain_eager
