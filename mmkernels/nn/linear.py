"""``mmkernels.nn.Linear``: ``nn.Linear`` whose forward runs :func:`mmkernels.linear`.

A subclass of ``torch.nn.Linear`` with the same parameters, state dict and autograd; only the
product changes: on CPUs where our float32 GEMM was measured (or calibrated) faster than torch's,
float32 calls run it on the weight prepacked once (cached per weight tensor, rebuilt after an
in-place change; ``mmkernels.clear_caches()`` after a write through ``.numpy()``), everything else
runs ``torch.nn.functional.linear``. :meth:`from_linear` wraps an existing layer's parameters
without copying them (tied weights stay tied). ``activation`` fuses an elementwise activation into
the product's epilogue (``Linear(..., activation="gelu")`` is ``nn.Sequential(nn.Linear(...),
nn.GELU())`` in one pass; :func:`mmkernels.patch` with ``linear=True`` uses it where a model's
MLP applies its activation straight to a layer's output).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..linear.api import linear
from .._activations import check_activation


class Linear(nn.Linear):
    """``y = act(x @ weight.T + bias)`` through :func:`mmkernels.linear`; ``backend`` forces one of
    its backends (None: automatic selection); ``activation``: None or a name of
    ``mmkernels._activations.ACTIVATIONS`` (``ValueError`` otherwise)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
        activation: Optional[str] = None,
    ):
        check_activation(activation)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = backend
        self.activation = activation

    @classmethod
    def from_linear(cls, layer: nn.Linear, backend: Optional[str] = None, activation: Optional[str] = None) -> "Linear":
        """A ``Linear`` sharing ``layer``'s weight and bias Parameters (no copy), then ``activation``."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer must be a torch.nn.Linear, got {type(layer).__name__}")
        check_activation(activation)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.register_parameter("weight", layer.weight)
        new.register_parameter("bias", layer.bias)
        new.backend = backend
        new.activation = activation
        new.train(layer.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.backend, activation=self.activation)

    def extra_repr(self) -> str:
        extra = f", backend={self.backend!r}" if self.backend else ""
        return super().extra_repr() + extra + (f", activation={self.activation!r}" if self.activation else "")
