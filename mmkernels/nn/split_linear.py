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
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

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
            raise ValueError(f"outlier_index must be a non-empty (k,) = ({outliers.in_features},) "
                             f"tensor, got shape {tuple(idx.shape)}")
        if not bool((idx[1:] > idx[:-1]).all()) or int(idx.min()) < 0 or int(idx.max()) >= k:
            raise ValueError(f"outlier_index must be sorted distinct channels in range({k})")
        if main.out_features != outliers.out_features:
            raise ValueError(f"main and outliers must have the same out_features, got "
                             f"{main.out_features} and {outliers.out_features}")
        if outliers.bias is not None:
            raise ValueError("the outliers part must have no bias (the bias lives in main)")
        keep = torch.ones(k, dtype=torch.bool, device=idx.device)
        keep[idx] = False
        self.in_features, self.out_features = k, main.out_features
        self.main, self.outliers = main, outliers
        self.register_buffer("main_index", torch.nonzero(keep).flatten())
        self.register_buffer("outlier_index", idx.clone())

    def forward(self, x: Tensor) -> Tensor:
        return (self.main(x.index_select(-1, self.main_index))
                + self.outliers(x.index_select(-1, self.outlier_index)))

    @property
    def bias(self):
        return self.main.bias

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The effective ``(N, K)`` weight in the original column order."""
        w = torch.empty(self.out_features, self.in_features, dtype=dtype,
                        device=self.main_index.device)
        w[:, self.main_index] = self.main.dequantized_weight(dtype)
        w[:, self.outlier_index] = self.outliers.dequantized_weight(dtype)
        return w

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"outlier_channels={self.outlier_index.numel()}")
