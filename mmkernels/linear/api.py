"""``linear``: argument checks, the ``mmkernels::linear`` custom op (fake implementation and
autograd formula, so ``torch.compile(fullgraph=True)`` and training go through it), dispatch.

```
y = mmkernels.linear(x, layer.weight, layer.bias)   # = torch.nn.functional.linear, faster where measured
h = mmkernels.linear(x, fc1.weight, fc1.bias, activation="gelu")   # = F.gelu(fc1(x)), fused
```
In plain eager mode (no autograd to record, not tracing or compiling, plain tensors: mmkernels._eager)
a call skips the custom op's dispatcher round trip and runs the selected backend directly.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from .._calibration import size_bucket
from .._describe import describe as _describe
from .._describe import dtype_name as _name
from .._eager import plain_eager
from .._activations import ACTIVATIONS, apply_activation, check_activation

OP = "linear"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class LinearCall(NamedTuple):
    device_type: str
    dtype_name: str
    # (M rounded up to a power of two, K, N): the size class calibrated auto-selection times
    # (mmkernels._calibration); None while tracing (no sizes).
    bucket: Optional[Tuple[int, int, int]] = None

    def __str__(self):
        size = "" if self.bucket is None else f", M~{self.bucket[0]}, K={self.bucket[1]}, N={self.bucket[2]}"
        return f"linear({self.dtype_name} on {self.device_type}{size})"


_CALLS = _dispatch.CallMemo()


def _select(x: Tensor, weight: Tensor, backend: str):
    device = x.device.type
    n, k = weight.shape

    def build() -> LinearCall:
        traced = type(x) is not Tensor or torch.compiler.is_compiling()
        bucket = None if traced else (size_bucket(x.numel() // k if k else 0), k, n)
        return LinearCall(device, _name(x.dtype), bucket)

    call = _CALLS.get((type(x), device, x.dtype, x.shape, weight.shape), build)
    return _dispatch.select(OP, call, device, backend or None)


def auto_backend(
    k: int, n: int, m: int = 256, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Tuple[str, str]:
    """The backend auto-selection takes here for an ``(m, k) x (n, k)^T`` call of ``dtype`` on
    ``device``, and why (its auto rule's verdict; calibration may time both on first use): what
    ``mmkernels.patch(model, linear=True)`` asks before it replaces a layer."""
    call = LinearCall(device, _name(dtype), (size_bucket(m), k, n))
    chosen = _dispatch.select(OP, call, device, None)
    forced, source = _dispatch._requested(OP, None)
    if forced is not None:
        return chosen.name, f"{source}={forced} forces it"
    return chosen.name, chosen.auto_verdict(call)[1] if chosen.auto_rule is not None else ""


def _linear_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str, activation: str) -> Tensor:
    return _select(x, weight, backend).run(x, weight, bias, activation or None)


@torch.library.custom_op("mmkernels::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str, activation: str) -> Tensor:
    return _linear_impl(x, weight, bias, backend, activation)


@_linear_op.register_fake
def _(x, weight, bias, backend, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, activation = inputs
    ctx.save_for_backward(x, weight, bias if activation else None)
    ctx.has_bias = bias is not None
    ctx.activation = activation


def _rows(t: Tensor) -> Tensor:
    """``t`` as a 2-D matrix of its last dim (any size may be 0, so not ``reshape(-1, ...)``)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _activation_backward(ctx, grad: Tensor) -> Tensor:
    """The gradient at the pre-activation: the product is recomputed (torch's F.linear) and the
    activation differentiated by torch's autograd, so the forward keeps no (M, N) tensor. Under
    ``create_graph`` (grad mode on here) the recomputation stays in the graph: double backward
    sees the activation's curvature and the product's dependence on x, weight and bias."""
    x, weight, bias = ctx.saved_tensors
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        if not create:
            x, weight = x.detach(), weight.detach()
            bias = None if bias is None else bias.detach()
        pre = torch.nn.functional.linear(x, weight, bias)
        if not pre.requires_grad:
            pre.requires_grad_(True)
        (grad_pre,) = torch.autograd.grad(ACTIVATIONS[ctx.activation](pre), pre, grad, create_graph=create)
    return grad_pre


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors[:2]
    if ctx.activation:
        grad = _activation_backward(ctx, grad)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ weight
    if ctx.needs_input_grad[1]:
        grad_w = _rows(grad).T @ _rows(x)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = _rows(grad).sum(0)
    return grad_x, grad_w, grad_b, None, None


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
    *,
    activation: Optional[str] = None,
) -> Tensor:
    """``y = act(x @ weight.T + bias)`` (``torch.nn.functional.linear``, then the activation):
    ``x (..., K)``, ``weight (N, K)``, ``bias (N,)`` or None, all of one dtype (float32 / bfloat16 /
    float16; float64 is the reference's) on one device; returns ``(..., N)``.

    ``activation``: None, ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"quick_gelu"`` or
    ``"silu"`` (formulas: ``mmkernels._activations``). Our CPU kernel applies it in the epilogue
    that stores the output (no second pass over ``(..., N)``); torch's backend runs torch's
    activation after ``F.linear``.

    The CPU backend serves float32 (the weight-only GEMM's micro-kernels on the weight prepacked once
    and cached per weight tensor: ``mmkernels.clear_caches()`` after writing a weight through
    ``.numpy()``); every other call, and any call where auto-selection keeps torch on this CPU,
    runs ``torch.nn.functional.linear`` (``backend="torch"``). Inside ``torch.autocast`` the call is
    ``torch.nn.functional.linear`` itself (autocast picks its compute dtype). Differentiable (the
    backward is torch's matmuls; with an activation the product is recomputed in the backward).
    NaN / inf: IEEE arithmetic, as the reference (docs/nan_semantics.md).
    Raises ``TypeError`` / ``ValueError`` naming the argument for a wrong type, shape, dtype,
    device or activation name.
    ``backend``: see ``mmkernels._dispatch`` (``mmkernels info`` shows the choice and why).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16 (float64 for the reference), got {_describe(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K) like nn.Linear.weight, got {_describe(weight)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be {_name(x.dtype)} on {x.device} like x, got {_describe(weight)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be (..., K) with K = weight.shape[1] = {k}, got {_describe(x)}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != x.dtype or tuple(bias.shape) != (n,) or bias.device != x.device:
            raise ValueError(f"bias must be {_name(x.dtype)} (N,) = ({n},) on {x.device}, got {_describe(bias)}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    check_activation(activation)
    if torch.is_autocast_enabled(x.device.type):
        # autocast decides the compute dtype of a linear layer (bf16 / fp16): torch's op carries it
        return apply_activation(torch.nn.functional.linear(x, weight, bias), activation)
    if plain_eager(x, weight, bias):
        return _linear_impl(x, weight, bias, backend or "", activation or "")
    return _linear_op(x, weight, bias, backend or "", activation or "")
