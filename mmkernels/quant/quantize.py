"""Round-to-nearest (RTN) weight quantization into a :class:`QuantizedWeight`.

Per group (one row of ``W`` restricted to ``group_size`` consecutive columns, or the whole row when
``group_size=None``), computed in float64 from the input:

* symmetric: ``s = max|w| / qmax`` (``qmax`` = 127 for int8, 7 for int4),
  ``q = clamp(round(w / s), qmin, qmax)`` with ``qmin`` = -128 / -8 (never reached: ``|w / s| <= qmax``).
* asymmetric: the range is widened to include zero, ``lo = min(min w, 0)``, ``hi = max(max w, 0)``
  (as GPTQ does, so 0 is exact and the zero point fits its unsigned range);
  ``s = (hi - lo) / (2^bits - 1)``, ``z = clamp(round(-lo / s), 0, 2^bits - 1)``,
  ``q = clamp(round(w / s) + z, 0, 2^bits - 1)``.

``s`` is rounded to float32 (the stored scale) *before* ``q`` is computed, so ``q`` is the nearest
grid point of the grid actually stored. A group whose scale would be 0 (all zeros) or subnormal gets
``s = 1`` (its values then quantize to 0 / z): no NaN, no Inf. ``round`` is half-to-even
(``torch.round``).

fp8 (``fp8=True``): symmetric, ``s = max|w| / 448`` per group (float32), ``q = float8_e4m3fn(w / s)``
(``w / s`` rounded to float32, then to the nearest e4m3 value, ties to even); no zero points.

SmoothQuant: to serve ``x @ W.T`` as ``(x / s) @ (W * s).T`` with per-input-feature factors
``s (K,)`` (see :func:`smoothquant_factors`), quantize ``W * s[None, :]`` and pass ``smooth=s`` to
``qmatmul``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .packing import FP8_DTYPE, FP8_MAX, QuantizedWeight, _check_config, pack_int4, qrange

_TINY = torch.finfo(torch.float32).tiny


def quantize_weight(
    w: Tensor, bits: int = 8, group_size: Optional[int] = None, symmetric: bool = True, *, fp8: bool = False
) -> QuantizedWeight:
    """Quantize ``w (N, K)`` (an ``nn.Linear`` weight) with RTN; see the module docstring.

    ``bits``: 8 or 4. ``group_size``: ``None`` (one scale per output channel) or 32 / 64 / 128
    (must divide ``K``). int4 needs an even ``K``. ``fp8=True``: float8 e4m3 values instead of
    integers (``bits=8``, symmetric). The result lives on ``w``'s device.
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N, K) like nn.Linear.weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating tensor, got {w.dtype}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be a bool, got {fp8!r}")
    if fp8 and (bits != 8 or not symmetric):
        raise ValueError(
            f"fp8=True stores float8 e4m3 values: it needs bits=8 and symmetric=True, "
            f"got bits={bits}, symmetric={symmetric}"
        )
    n, k = w.shape
    _check_config(bits, group_size, k)
    if n == 0:
        raise ValueError(f"w must have at least one output channel, got shape {tuple(w.shape)}")
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; cannot quantize")

    gs = k if group_size is None else group_size
    g = k // gs
    wg = w.detach().to(torch.float64).reshape(n, g, gs)
    if fp8:
        scale = _safe_scale(wg.abs().amax(dim=2) / FP8_MAX)
        q = (wg / scale.double()[:, :, None]).to(torch.float32).clamp(-FP8_MAX, FP8_MAX)
        return QuantizedWeight(q.reshape(n, k).to(FP8_DTYPE), scale, None, bits=8, group_size=group_size, shape=(n, k))
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = _safe_scale(wg.abs().amax(dim=2) / qmax)
        q = torch.clamp(torch.round(wg / scale.double()[:, :, None]), qmin, qmax)
        zeros = None
    else:
        lo = wg.amin(dim=2).clamp(max=0)
        hi = wg.amax(dim=2).clamp(min=0)
        scale = _safe_scale((hi - lo) / qmax)
        s64 = scale.double()
        z = torch.clamp(torch.round(-lo / s64), 0, qmax)
        q = torch.clamp(torch.round(wg / s64[:, :, None]) + z[:, :, None], 0, qmax)
        zeros = z.to(torch.uint8)
    q = q.reshape(n, k)
    if bits == 4:
        qweight = pack_int4(q.to(torch.int16))
    else:
        qweight = q.to(torch.int8 if symmetric else torch.uint8)
    return QuantizedWeight(qweight, scale, zeros, bits=bits, group_size=group_size, shape=(n, k))


def _safe_scale(scale64: Tensor) -> Tensor:
    """float32 scale; 0 / subnormal (all-zero or ~zero groups) -> 1."""
    s = scale64.to(torch.float32)
    return torch.where(s >= _TINY, s, torch.ones_like(s))


def smoothquant_factors(act_absmax: Tensor, w: Tensor, alpha: float = 0.5, eps: float = 1e-5) -> Tensor:
    """SmoothQuant per-input-feature factors ``s_j = max|X_j|^alpha / max_n |W_nj|^(1 - alpha)``.

    ``act_absmax (K,)``: calibrated max |activation| per input feature; ``w (N, K)``. Returns float32
    ``(K,)``, clamped to ``>= eps``. Quantize ``w * s`` and call ``qmatmul(..., smooth=s)``.
    """
    if not isinstance(act_absmax, Tensor) or act_absmax.dim() != 1 or act_absmax.shape[0] != w.shape[-1]:
        raise ValueError(
            f"act_absmax must be a (K,) = ({w.shape[-1]},) tensor, got {getattr(act_absmax, 'shape', act_absmax)!r}"
        )
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    a = act_absmax.double().clamp(min=eps)
    wmax = w.detach().double().abs().amax(dim=0).clamp(min=eps)
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=eps).to(torch.float32)
