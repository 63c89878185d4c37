"""SmoothQuant for W8A8, per layer, with a searched migration strength.

From Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models" (ICML 2023, arXiv:2211.10438): activation outliers sit in
a few input channels, so per-token int8 activations lose the small channels. Dividing input channel
``j`` by ``s_j`` and multiplying weight column ``j`` by ``s_j`` leaves ``x @ W.T`` unchanged and
moves difficulty from activations to weights, with ``s_j = max|X_j|^alpha / max|W_:j|^(1-alpha)``
(:func:`~mmkernels.quant.smoothquant_factors`; ``max|X_j|`` calibrated with hooks).

The paper picks one ``alpha`` per model (0.5 for most; up to 0.75-0.85 for hard ones) and folds
``1/s`` into the preceding LayerNorm; here ``1/s`` is applied inside ``qmatmul`` (``smooth=``),
so every Linear can be smoothed, whatever precedes it, and :func:`search_alpha` chooses ``alpha``
per layer from a grid by the layer's output error on calibration inputs (the grid search over
``alpha`` that the paper runs per model, done per layer; "no smoothing" is a candidate too).

:func:`emulate` computes a candidate's output exactly as ``qmatmul``'s reference defines it
(per-token int8 activations, integer weights), with float32 matrix products so the search is fast:
integer products are exact in float32 and only the sums round (relative error ~1e-7).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..quant.packing import QuantizedWeight
from ..quant.quantize import smoothquant_factors
from ..quant.reference import quantize_activations, quantize_activations_fp8

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def emulate(
    x: Tensor,
    qw: QuantizedWeight,
    bias: Optional[Tensor],
    act_bits: Optional[int],
    smooth: Optional[Tensor],
    perm: Optional[Tensor] = None,
) -> Tensor:
    """What ``QuantLinear.from_quantized(qw, bias, act_bits=act_bits, smooth=smooth,
    input_perm=perm)`` computes for a 2-D ``x``, in float32 (gather, divide, then qmatmul)."""
    x = x.float()
    if perm is not None:
        x = x[:, perm]
    if smooth is not None:
        x = x / smooth.float()
    if act_bits is None:
        y = x @ qw.dequantize(torch.float32).T
    elif qw.fp8:
        xq, sx = quantize_activations_fp8(x)
        y = (xq.float() @ qw.qweight.float().T) * sx[:, None] * qw.scales[:, 0][None, :]
    else:
        xq, sx = quantize_activations(x)
        y = (xq.float() @ qw.int_weight().float().T) * sx[:, None] * qw.scales[:, 0][None, :]
    return y if bias is None else y + bias.float()


Quantizer = Callable[[Tensor, Optional[Tensor]], Tuple[QuantizedWeight, Optional[Tensor]]]


def search_alpha(
    w: Tensor,
    bias: Optional[Tensor],
    x: Tensor,
    absmax: Tensor,
    quantize: Quantizer,
    act_bits: Optional[int],
    grid: Sequence[float] = ALPHA_GRID,
) -> Tuple[Optional[float], Optional[Tensor], float]:
    """Best SmoothQuant ``alpha`` for one layer: ``(alpha, factors, output MSE)``; ``alpha`` and
    ``factors`` are ``None`` when no smoothing wins.

    ``quantize(w_smoothed, factors) -> (QuantizedWeight, perm or None)`` makes a candidate (RTN or
    GPTQ; the factors let GPTQ rescale its Hessian; ``perm``: GPTQ's column order).
    ``x (M, K)``: calibration inputs; ``absmax (K,)``: their per-channel max ``|x|``.
    """
    y_ref = x.float() @ w.float().T
    if bias is not None:
        y_ref = y_ref + bias.float()

    def mse(s):
        qw, perm = quantize(w if s is None else w * s[None, :], s)
        stored = s if (s is None or perm is None) else s[perm]
        return float(((emulate(x, qw, bias, act_bits, stored, perm) - y_ref) ** 2).mean())

    best = (None, None, mse(None))
    for alpha in grid:
        s = smoothquant_factors(absmax, w, alpha)
        err = mse(s)
        if err < best[2]:
            best = (alpha, s, err)
    return best
