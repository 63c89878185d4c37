"""Argument checks of quantize_weight, qmatmul and QuantizedWeight: errors name the argument, what
was seen and what was expected."""

import pytest
import torch

from mmkernels.quant import QuantizedWeight, qmatmul, quantize_weight


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bits=3), ValueError, "bits"),
        (dict(bits=True), ValueError, "bits"),
        (dict(group_size=16), ValueError, "group_size"),
        (dict(group_size=96), ValueError, "group_size"),
        (dict(symmetric=1), TypeError, "symmetric"),
    ],
)
def test_quantize_bad_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_weight(torch.randn(4, 128), **kwargs)


def test_quantize_bad_weights():
    with pytest.raises(ValueError, match="group_size=64 must divide K"):
        quantize_weight(torch.randn(4, 96), 4, 64)
    with pytest.raises(ValueError, match="K .* must be even"):
        quantize_weight(torch.randn(4, 33), 4, None)
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_weight(torch.randn(4, 8, 2))
    with pytest.raises(TypeError, match="w must be a floating"):
        quantize_weight(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_weight([[1.0]])
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(torch.full((4, 64), float("nan")))


def test_qmatmul_bad_args():
    qw = quantize_weight(torch.randn(8, 64), 8)
    qw4 = quantize_weight(torch.randn(8, 64), 4, 32)
    x = torch.randn(3, 64)
    cases = [
        (lambda: qmatmul(x, torch.randn(8, 64)), TypeError, "qw must be"),
        (lambda: qmatmul(x[:, :32], qw), ValueError, "x must be .* K = qw.in_features = 64"),
        (lambda: qmatmul(x.int(), qw), TypeError, "x must be float32"),
        (lambda: qmatmul(x, qw, torch.randn(7)), ValueError, r"bias must be .*\(8,\)"),
        (lambda: qmatmul(x, qw, torch.ones(8, dtype=torch.int64)), ValueError, "bias"),
        (lambda: qmatmul(x, qw, act_bits=4), ValueError, "act_bits"),
        (lambda: qmatmul(x, qw4, act_bits=8), ValueError, "act_bits=8 needs an 8-bit per-channel"),
        (lambda: qmatmul(x, qw, smooth=torch.ones(63)), ValueError, "smooth"),
        (lambda: qmatmul(x.to("meta"), qw), ValueError, "x is on meta but qw is on cpu"),
        (lambda: qmatmul(x, qw, backend="nope"), ValueError, "unknown backend 'nope'"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_empty_and_from_state_dict_errors():
    with pytest.raises(ValueError, match="bits"):
        QuantizedWeight.empty((4, 64), bits=2)
    with pytest.raises(KeyError, match="meta"):
        QuantizedWeight.from_state_dict({"qweight": torch.zeros(1)})
    with pytest.raises(ValueError, match="scales must be float32"):
        QuantizedWeight(
            torch.zeros(4, 64, dtype=torch.int8),
            torch.ones(4, 1, dtype=torch.float16),
            None,
            bits=8,
            group_size=None,
            shape=(4, 64),
        )
