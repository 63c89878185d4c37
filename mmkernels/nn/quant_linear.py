"""``mmkernels.nn.QuantLinear``: a drop-in ``nn.Linear`` whose weight is quantized.

``forward(x) = qmatmul(x[..., input_perm] if input_perm is set else x, quantized, bias, act_bits,
smooth=smooth, activation=activation)``; ``activation`` (an attribute, not state: None unless set,
e.g. by ``mmkernels.patch`` fusing the MLP's activation into the layer) is applied to the output in
the kernels' epilogue.

State dict (all buffers; nothing is trainable)::

    quantized.qweight / quantized.scales / quantized.zeros / quantized.meta   (QuantizedWeight)
    bias          (N,)  the original bias (dtype kept), absent when the layer has none
    smooth        (K,)  SmoothQuant factors x is divided by (W8A8), absent when unused
    input_perm    (K,)  int64 column order of the stored weight, absent when unused

``input_perm`` is how GPTQ's activation ordering is served without scattered groups: GPTQ visits
the columns in the order ``perm`` (descending Hessian diagonal); the weight is stored with its
columns in that order, so each quantization group is a contiguous run of ``group_size`` stored
columns, and the input is gathered the same way (``x[..., perm]``). The GPTQ ecosystem's
``g_idx`` (group of each *original* column) is ``g_idx[perm[j]] = j // group_size``.

Changing the weight in place: torch in-place ops and ``load_state_dict`` are always seen. The CPU
backend caches a prepacked copy of the weight, validated by the buffers' autograd version
counters; a write that bypasses them (through ``.numpy()``, ``torch.from_numpy``'s array, DLPack,
raw pointers, or to buffers created under ``torch.inference_mode()``) is not seen: call
``mmkernels.clear_caches()`` after it, or the layer keeps computing with the old weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..quant.api import qmatmul
from ..quant.packing import QuantizedWeight
from ..quant.quantize import quantize_weight


class QuantLinear(nn.Module):
    """``y = x @ W_hat.T + b`` with ``W_hat`` a :class:`~mmkernels.quant.QuantizedWeight`.

    Build one with :meth:`from_linear` (round-to-nearest from an ``nn.Linear``), with
    :meth:`from_quantized` (a weight quantized elsewhere, e.g. by GPTQ), or with the constructor
    (an empty layer of the given configuration, to ``load_state_dict`` into).
    ``activation``: None, or a name of ``mmkernels._activations.ACTIVATIONS`` applied to ``y``.
    """

    activation: Optional[str] = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 8,
        group_size: Optional[int] = None,
        symmetric: bool = True,
        fp8: bool = False,
        act_bits: Optional[int] = None,
        smooth: bool = False,
        input_perm: bool = False,
        backend: Optional[str] = None,
        device=None,
        dtype=torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.act_bits = act_bits
        self.backend = backend
        self.quantized = QuantizedWeight.empty(
            (out_features, in_features), bits=bits, group_size=group_size, symmetric=symmetric, fp8=fp8, device=device
        )
        self.register_buffer("bias", torch.zeros(out_features, device=device, dtype=dtype) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        self.register_buffer("input_perm", torch.arange(in_features, device=device) if input_perm else None)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_quantized(
        cls,
        quantized: QuantizedWeight,
        bias: Optional[Tensor] = None,
        *,
        act_bits: Optional[int] = None,
        smooth: Optional[Tensor] = None,
        input_perm: Optional[Tensor] = None,
        backend: Optional[str] = None,
    ) -> "QuantLinear":
        """Wrap an existing quantized weight (no copy of its buffers)."""
        if not isinstance(quantized, QuantizedWeight):
            raise TypeError(f"quantized must be a QuantizedWeight, got {type(quantized).__name__}")
        n, k = quantized.shape
        if act_bits is not None and (act_bits != 8 or quantized.bits != 8 or quantized.group_size is not None):
            raise ValueError(
                f"act_bits must be None or 8, and act_bits=8 needs an 8-bit "
                f"per-channel weight; got act_bits={act_bits!r} with {quantized}"
            )
        _check_vector("bias", bias, n)
        _check_vector("smooth", smooth, k)
        _check_vector("input_perm", input_perm, k)
        if input_perm is not None:
            if input_perm.dtype != torch.int64 or not torch.equal(
                torch.sort(input_perm).values, torch.arange(k, device=input_perm.device)
            ):
                raise ValueError(f"input_perm must be an int64 permutation of range({k})")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = k, n
        layer.act_bits, layer.backend = act_bits, backend
        layer.quantized = quantized
        layer.register_buffer("bias", None if bias is None else bias.detach().clone())
        layer.register_buffer("smooth", None if smooth is None else smooth.detach().to(torch.float32).clone())
        layer.register_buffer("input_perm", None if input_perm is None else input_perm.clone())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        bits: int = 8,
        group_size: Optional[int] = None,
        symmetric: bool = True,
        fp8: bool = False,
        act_bits: Optional[int] = None,
        smooth: Optional[Tensor] = None,
        backend: Optional[str] = None,
    ) -> "QuantLinear":
        """Round-to-nearest quantization of ``linear.weight`` (see ``quantize_weight``).

        ``smooth``: SmoothQuant factors ``(K,)`` (``quant.smoothquant_factors``); the weight is
        quantized as ``W * smooth`` and inputs are divided by ``smooth``. For GPTQ use
        ``mmkernels.quantize_model(..., method="gptq")``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if smooth is not None:
            _check_vector("smooth", smooth, w.shape[1])
            w = w.to(torch.float32) * smooth.to(w.device, torch.float32)[None, :]
        qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric, fp8=fp8)
        return cls.from_quantized(qw, linear.bias, act_bits=act_bits, smooth=smooth, backend=backend)

    # --- use ----------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        # The buffer and submodule tables directly: nn.Module.__getattr__ costs ~0.5 us a name.
        buffers = self._buffers
        perm = buffers["input_perm"]
        if perm is not None:
            x = x.index_select(-1, perm)
        quantized = self._modules["quantized"]
        return qmatmul(
            x,
            quantized,
            buffers["bias"],
            self.act_bits,
            self.backend,
            smooth=buffers["smooth"],
            activation=self.activation,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The effective ``(N, K)`` weight in the original column order (smoothing undone)."""
        w = self.quantized.dequantize(torch.float64 if dtype == torch.float64 else torch.float32)
        if self.smooth is not None:
            w = w / self.smooth.to(w.dtype)[None, :]
        if self.input_perm is not None:
            w = w[:, torch.argsort(self.input_perm)]
        return w.to(dtype)

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            self.quantized.extra_repr(),
        ]
        if self.act_bits:
            parts.append(f"act_bits={self.act_bits}")
        if self.smooth is not None:
            parts.append("smooth")
        if self.input_perm is not None:
            parts.append("input_perm")
        if self.activation:
            parts.append(f"activation={self.activation!r}")
        return ", ".join(parts)


def _check_vector(name: str, t: Optional[Tensor], length: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a ({length},) tensor or None, got {getattr(t, 'shape', type(t).__name__)}")
