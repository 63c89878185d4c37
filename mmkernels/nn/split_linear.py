"""``mmkernels.nn.OutlierSplitLinear``: a W8A8 linear layer whose few outlier input channels get
their own int8 GEMM (own per-token activation scales, own per-channel weight scales).

Per-token int8 activations lose the small channels of a token whose scale is set by a handful of
outlier channels (Dettmers et al., "LLM.int8()", 2022; Xiao et al., "SmoothQuant", 2023). LLM.int8()
keeps those channels in float16; here they stay int8, served by a second :class:`QuantLinear`::

    y = main(x[..., main_index]) + outliers(x[..., outlier_index])

Both parts are ordinary ``QuantLinear`` W8A8 layers (``qmatmul`` with ``act_bits=8``): every
activation is quantized per token to int8, every weight is int8; the bias lives in ``main``. It is
"per-token activation quantization with two channel groups" (Atom, Zhao et al. 2024, and QuaRot use
finer channel groups). Cost: one extra GEMM with ``K = len(outlier_index)`` (a few channels) and
two gathers of ``x``. Built by :func:`mmkernels.quantize_model` with ``outlier_channels=k``.

Fast path (eager float32 on CPU, both parts W8A8 with 8-bit per-channel weights): the main part
runs on the full ``x`` without a gather, through a derived full-width weight whose outlier columns
are zero (``q = z``) and a derived ``smooth`` that is ``inf`` on the outlier channels: ``x / inf``
is 0, so those channels change neither the per-token scale nor the dot products, and the result
equals ``main(x[..., main_index])`` bit for bit (a NaN or ``±inf`` outlier value makes the row NaN,
as the outlier part does anyway). The outlier part (a few columns) is quantized per token exactly
as ``qmatmul``'s reference does and added in place with one rank-``k`` ``addmm_`` (float32
rounding of that sum may differ from the two-GEMM form in the last bits). The derived tensors are
cached and rebuilt when a buffer of either part changes (autograd version counters, like the CPU
backend's prepacked weights; after ``mmkernels.clear_caches()`` too, once the CPU backend has
prepacked the derived weight).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _packed_cache
from ..quant import reference as _qref
from .quant_linear import QuantLinear


class OutlierSplitLinear(nn.Module):
    """``main(x[..., main_index]) + outliers(x[..., outlier_index])`` (see the module docstring).

    ``outlier_index``: int64, sorted, distinct input channels; ``main`` serves the others (in
    increasing order), ``outliers`` those, without bias.
    """

    def __init__(self, main: QuantLinear, outliers: QuantLinear, outlier_index: Tensor):
        super().__init__()
        k = main.in_features + outliers.in_features
        idx = torch.as_tensor(outlier_index, dtype=torch.int64)
        if idx.dim() != 1 or idx.numel() != outliers.in_features or idx.numel() == 0:
            raise ValueError(
                f"outlier_index must be a non-empty (k,) = ({outliers.in_features},) "
                f"tensor, got shape {tuple(idx.shape)}"
            )
        if not bool((idx[1:] > idx[:-1]).all()) or int(idx.min()) < 0 or int(idx.max()) >= k:
            raise ValueError(f"outlier_index must be sorted distinct channels in range({k})")
        if main.out_features != outliers.out_features:
            raise ValueError(
                f"main and outliers must have the same out_features, got "
                f"{main.out_features} and {outliers.out_features}"
            )
        if outliers.bias is not None:
            raise ValueError("the outliers part must have no bias (the bias lives in main)")
        keep = torch.ones(k, dtype=torch.bool, device=idx.device)
        keep[idx] = False
        self.in_features, self.out_features = k, main.out_features
        self.main, self.outliers = main, outliers
        self.register_buffer("main_index", torch.nonzero(keep).flatten())
        self.register_buffer("outlier_index", idx.clone())

    def forward(self, x: Tensor) -> Tensor:
        fused = self._fused(x)
        if fused is None:
            return self.main(x.index_select(-1, self.main_index)) + self.outliers(
                x.index_select(-1, self.outlier_index)
            )
        full_qw, full_smooth, out_index, out_smooth, out_weight_t = fused
        from ..quant.api import qmatmul

        y = qmatmul(x, full_qw, self.main.bias, 8, self.main.backend, smooth=full_smooth)
        _note_prepacked(full_qw.qweight)
        x2 = x.reshape(-1, self.in_features)
        xo = x2.index_select(1, out_index)
        if out_smooth is not None:
            xo = xo / out_smooth
        xq, sx = _qref.quantize_activations(xo)  # the W8A8 spec, on k columns
        y.view(-1, self.out_features).addmm_(xq.to(torch.float32).mul_(sx[:, None]), out_weight_t)
        return y

    # --- fast path: derived full-width main weight ------------------------------------------

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_fused_entry", None)  # derived, rebuilt on demand
        return state

    def _stamp(self) -> tuple:
        parts = []
        for t in (
            self.main_index,
            self.outlier_index,
            self.main.quantized.qweight,
            self.main.quantized.scales,
            self.main.quantized.zeros,
            self.main.smooth,
            self.main.input_perm,
            self.outliers.quantized.qweight,
            self.outliers.quantized.scales,
            self.outliers.quantized.zeros,
            self.outliers.smooth,
            self.outliers.input_perm,
        ):
            parts.append(None if t is None else (id(t), t.data_ptr(), _packed_cache.version(t)))
        return tuple(parts)

    def _fast_ok(self, x: Tensor) -> bool:
        main, outl = self.main, self.outliers
        if (
            x.dtype != torch.float32
            or x.device.type != "cpu"
            or x.dim() < 1
            or torch.compiler.is_compiling()
            or type(x) is not Tensor
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return False
        for part in (main, outl):
            qw = part.quantized
            if (
                part.act_bits != 8
                or qw.bits != 8
                or qw.group_size is not None
                or qw.fp8
                or qw.qweight.device.type != "cpu"
            ):
                return False
        return main.bias is None or main.bias.dtype == torch.float32

    def _fused(self, x: Tensor) -> Optional[Tuple]:
        """The derived tensors of the fast path, or None when it does not apply to ``x``."""
        if not self._fast_ok(x):
            return None
        stamp = self._stamp()
        entry = self.__dict__.get("_fused_entry")
        if entry is not None and entry[0] == stamp and _prepack_alive(entry[1]):
            return entry[1]
        with torch.no_grad():
            tensors = self._build_fused()
        self.__dict__["_fused_entry"] = (stamp, tensors)
        return tensors

    def _build_fused(self) -> Tuple:
        from ..quant.packing import QuantizedWeight

        main, outl = self.main, self.outliers
        mq = main.quantized
        n, k = self.out_features, self.in_features
        # stored column j of main serves input channel cols[j]
        cols = self.main_index if main.input_perm is None else self.main_index[main.input_perm]
        if mq.zeros is None:
            full = torch.zeros(n, k, dtype=mq.qweight.dtype)
        else:
            full = mq.zeros[:, :1].expand(n, k).clone()  # q = z: centered weight 0
        full[:, cols] = mq.qweight
        smooth = torch.full((k,), float("inf"), dtype=torch.float32)
        smooth[cols] = main.smooth.to(torch.float32) if main.smooth is not None else torch.ones(cols.numel())
        full_qw = QuantizedWeight(
            full,
            mq.scales.clone(),
            None if mq.zeros is None else mq.zeros.clone(),
            bits=8,
            group_size=None,
            shape=(n, k),
        )
        out_index = self.outlier_index if outl.input_perm is None else self.outlier_index[outl.input_perm]
        out_smooth = None if outl.smooth is None else outl.smooth.to(torch.float32).clone()
        oq = outl.quantized
        w = _qref.centered_weight(oq.qweight, oq.zeros, 8).to(torch.float32) * oq.scales[:, :1]
        return full_qw, smooth, out_index.clone(), out_smooth, w.t().contiguous()

    @property
    def bias(self):
        return self.main.bias

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The effective ``(N, K)`` weight in the original column order."""
        w = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.main_index.device)
        w[:, self.main_index] = self.main.dequantized_weight(dtype)
        w[:, self.outlier_index] = self.outliers.dequantized_weight(dtype)
        return w

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"outlier_channels={self.outlier_index.numel()}"
        )


def _note_prepacked(qweight: Tensor) -> None:
    if not getattr(qweight, "_mmk_prepacked", False) and _packed_cache.is_cached(qweight):
        qweight._mmk_prepacked = True


def _prepack_alive(fused: Tuple) -> bool:
    """False once ``mmkernels.clear_caches()`` dropped the CPU backend's prepacked copy of the
    derived weight after its first use (so that a write which bypassed the version counters is
    seen here too)."""
    qweight = fused[0].qweight
    return not getattr(qweight, "_mmk_prepacked", False) or _packed_cache.is_cached(qweight)
