"""``qmatmul``: argument checks, the ``mmkernels::qmatmul`` custom op, dispatch.

```
qw = mmkernels.quantize_weight(linear.weight, bits=4, group_size=128)
y = mmkernels.qmatmul(x, qw, bias=linear.bias)             # weight-only int4
qw8 = mmkernels.quantize_weight(linear.weight, bits=8)
y = mmkernels.qmatmul(x, qw8, linear.bias, act_bits=8)     # W8A8, dynamic per-token activations
```
The definition is in reference.py. The custom op takes the weight's raw buffers (a module cannot
cross the op boundary) and has a fake implementation, so ``torch.compile(fullgraph=True)`` traces
through it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from .._activations import apply_activation, check_activation
from .._eager import plain_eager
from .._calibration import size_bucket
from .._describe import describe as _describe
from .._describe import dtype_name as _name
from .packing import QuantizedWeight, is_fp8

# Backends that take ``activation`` and apply it in their own epilogue, in the compute dtype before
# the output's rounding (reference.qmatmul_tensors' order); the others' output gets torch's
# activation after the call (the GPU backends: not fused yet).
EPILOGUE_ACTIVATION = frozenset({"cpu", "torch", "reference"})

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class QMatmulCall(NamedTuple):
    device_type: str
    dtype_name: str
    bits: int
    group_size: int  # 0: per output channel
    symmetric: bool
    act_bits: int  # 0: weight-only
    smooth: bool
    fp8: bool = False  # float8 e4m3 weights (and activations when act_bits=8)
    # (M rounded up to a power of two, K, N) of W8A8 calls: the size class that calibrated
    # auto-selection times (mmkernels._calibration); None for weight-only calls and while tracing.
    bucket: Optional[Tuple[int, int, int]] = None

    def __str__(self):
        g = "per-channel" if not self.group_size else f"group {self.group_size}"
        a = f"A{self.act_bits}" if self.act_bits else "weight-only"
        w = "fp8 e4m3" if self.fp8 else f"int{self.bits}"
        return (
            f"qmatmul({self.dtype_name} on {self.device_type}, {w} {g} "
            f"{'sym' if self.symmetric else 'asym'}, {a}{', smooth' if self.smooth else ''})"
        )


def _group_size(qweight: Tensor, scales: Tensor, bits: int) -> int:
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    return 0 if scales.shape[1] == 1 else k // scales.shape[1]


def _size_bucket(x: Tensor, qweight: Tensor, act_bits: int) -> Optional[Tuple[int, int, int]]:
    k = x.shape[-1]
    if not act_bits or type(x) is not Tensor or torch.compiler.is_compiling() or k == 0:
        return None  # weight-only (only W8A8 is calibrated), FakeTensor or tracing: no sizes
    return size_bucket(x.numel() // k), k, qweight.shape[0]


_CALLS = _dispatch.CallMemo()


def _select(x: Tensor, qweight: Tensor, scales: Tensor, zeros, bits: int, act_bits: int, smooth: bool, backend: str):
    device = x.device.type

    def build() -> QMatmulCall:
        return QMatmulCall(
            device,
            _name(x.dtype),
            bits,
            _group_size(qweight, scales, bits),
            zeros is None,
            act_bits,
            smooth,
            is_fp8(qweight),
            _size_bucket(x, qweight, act_bits),
        )

    # keyed on everything build() reads
    key = (
        type(x),
        device,
        x.dtype,
        x.shape,
        qweight.dtype,
        qweight.shape,
        scales.shape,
        zeros is None,
        bits,
        act_bits,
        smooth,
    )
    call = _CALLS.get(key, build)
    return _dispatch.select("qmatmul", call, device, backend or None)


def _qmatmul_impl(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    bias: Optional[Tensor],
    smooth: Optional[Tensor],
    bits: int,
    act_bits: int,
    backend: str,
    activation: str,
) -> Tensor:
    b = _select(x, qweight, scales, zeros, bits, act_bits, smooth is not None, backend)
    args = (x, qweight, scales, zeros, bits, bias, act_bits or None, smooth)
    if not activation:
        return b.run(*args).contiguous()
    if b.name in EPILOGUE_ACTIVATION:
        return b.run(*args, activation).contiguous()
    return apply_activation(b.run(*args), activation).contiguous()


@torch.library.custom_op("mmkernels::qmatmul", mutates_args=())
def _qmatmul_op(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    bias: Optional[Tensor],
    smooth: Optional[Tensor],
    bits: int,
    act_bits: int,
    backend: str,
    activation: str,
) -> Tensor:
    return _qmatmul_impl(x, qweight, scales, zeros, bias, smooth, bits, act_bits, backend, activation)


@_qmatmul_op.register_fake
def _(x, qweight, scales, zeros, bias, smooth, bits, act_bits, backend, activation):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def qmatmul(
    x: Tensor,
    qw: QuantizedWeight,
    bias: Optional[Tensor] = None,
    act_bits: Optional[int] = None,
    backend: Optional[str] = None,
    *,
    smooth: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """``y = act(x @ W_hat.T + bias)`` for a quantized weight ``qw (N, K)``; ``x (..., K) -> (..., N)``.

    ``x``: float32 / bfloat16 / float16 (float64 too: served by the reference, used as the test
    oracle). ``bias``: floating ``(N,)`` on ``x``'s device (cast to the compute dtype).
    ``act_bits``: ``None`` (weight-only) or ``8`` (W8A8: dynamic per-token int8 activations, or
    float8 e4m3 activations for an fp8 ``qw``; needs an 8-bit per-channel ``qw``). ``smooth``:
    SmoothQuant factors ``(K,)`` that ``x`` is divided by
    (``qw`` must be ``quantize_weight(W * smooth)``). ``activation``: None, ``"relu"``,
    ``"gelu"``, ``"gelu_tanh"``, ``"quick_gelu"`` or ``"silu"`` (``mmkernels._activations``),
    applied in the compute dtype before the output's rounding; the CPU kernels run it in their
    output epilogue, the GPU backends (triton, cuda) apply torch's activation to their output.
    ``backend``: see ``mmkernels._dispatch``. No autograd formula yet (inference only).

    NaN / inf (every backend, docs/nan_semantics.md): with ``act_bits=8`` a row of ``x / smooth``
    holding a NaN or ``±inf`` gets a NaN per-token scale, so its output row is NaN; weight-only
    products follow IEEE arithmetic (a NaN row gives a NaN row; ``±inf`` gives ``±inf`` or NaN).
    A zero in ``smooth`` is divided by like any value (no check: it would cost a host sync).
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a mmkernels QuantizedWeight (from quantize_weight), got {type(qw).__name__}")
    n, k = qw.shape
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16 (float64 for the reference), got {_describe(x)}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be (..., K) with K = qw.in_features = {k}, got {_describe(x)}")
    qweight, scales, zeros = qw.kernel_tensors()
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but qw is on {qweight.device} (move it with qw.to(device))")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point() or tuple(bias.shape) != (n,) or bias.device != x.device:
            raise ValueError(f"bias must be a floating (N,) = ({n},) tensor on {x.device}, got {_describe(bias)}")
    if smooth is not None:
        if not isinstance(smooth, Tensor):
            raise TypeError(f"smooth must be a torch.Tensor or None, got {type(smooth).__name__}")
        if not smooth.is_floating_point() or tuple(smooth.shape) != (k,) or smooth.device != x.device:
            raise ValueError(f"smooth must be a floating (K,) = ({k},) tensor on {x.device}, got {_describe(smooth)}")
    if act_bits is not None:
        if isinstance(act_bits, bool) or act_bits != 8:
            raise ValueError(f"act_bits must be None (weight-only) or 8, got {act_bits!r}")
        if qw.bits != 8 or qw.group_size is not None:
            raise ValueError(
                f"act_bits=8 needs an 8-bit per-channel weight "
                f"(quantize_weight(w, bits=8, group_size=None)), got qw with "
                f"bits={qw.bits}, group_size={qw.group_size}"
            )
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    check_activation(activation)
    args = (x, qweight, scales, zeros, bias, smooth, qw.bits, act_bits or 0, backend or "", activation or "")
    if plain_eager(x, bias, smooth):
        return _qmatmul_impl(*args)
    return _qmatmul_op(*args)
