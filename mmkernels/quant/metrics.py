"""Quantization quality metrics."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sqnr(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - approx)^2)``,
    computed in float64 (as torchao's ``compute_error``, which writes it with norms and 20 log10).

    ``inf`` when ``approx == ref`` exactly; ``-inf`` when ``ref`` is all zero but ``approx`` is not.
    """
    if not isinstance(ref, Tensor) or not isinstance(approx, Tensor):
        raise TypeError("sqnr: ref and approx must be tensors")
    if ref.shape != approx.shape:
        raise ValueError(f"sqnr: ref {tuple(ref.shape)} and approx {tuple(approx.shape)} must have the same shape")
    r = ref.detach().to(torch.float64)
    signal = float((r * r).sum())
    noise = float(((r - approx.detach().to(torch.float64)) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
