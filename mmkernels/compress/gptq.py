"""GPTQ: second-order weight quantization into a :class:`QuantizedWeight`.

Implemented from Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers" (ICLR 2023, arXiv:2210.17323), which builds on Optimal
Brain Quantization (Frantar & Alistarh 2022). For one linear layer ``y = x @ W.T`` it minimises the
layer's output error on calibration inputs ``X``, ``||W X - W_hat X||^2``, whose Hessian with
respect to each row of ``W`` is ``H = 2 X X^T`` (the same for every row; :class:`Hessian`
accumulates it). Columns are quantized one at a time, in a fixed order, and the error of each is
spread over the columns not yet quantized (paper, eq. 2-3)::

    err        = (w[:, j] - quant(w[:, j])) / U[j, j]
    w[:, j+1:] -= err[:, None] * U[j, j+1:]

with ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``): row ``j`` of ``U`` is, up to a
scale, row ``j`` of the inverse Hessian after the first ``j`` columns were eliminated (paper,
"Step 3: Cholesky reformulation"). Updates are applied lazily (paper, "Step 2"): inside a block of
``block_size`` columns as above, and to the columns after the block once per block with one matrix
product. ``H`` is dampened by ``percdamp * mean(diag(H))`` on its diagonal before inversion; a
column that never sees a non-zero input (``H[j, j] == 0``, a "dead" column) gets ``H[j, j] = 1``
and ``w[:, j] = 0``.

Quantization grid: exactly the round-to-nearest grid of :func:`quantize_weight` (float32 scale,
same zero point and clamping), so the result is a valid QuantizedWeight that ``qmatmul`` serves
unchanged. With groups (``group_size`` 32 / 64 / 128), a group's scale and zero point are computed
when GPTQ reaches the group's first column, from the *updated* weights of the group's columns
(errors of earlier groups already folded in); per channel (``group_size=None``) they come from the
whole row before any update. Blocks hold whole groups (``block_size`` is rounded up to a multiple of
``group_size``), so a group's columns are all present when it starts.

Activation order (``desc_act=True``, the "act-order" heuristic of the GPTQ authors' code release,
not in the paper): columns are visited in order of decreasing ``diag(H)`` (largest input energy
first). The weight is then *stored with its columns permuted*: stored column ``j`` is original
column ``perm[j]``, so every group is ``group_size`` consecutive stored columns and the format is
unchanged; :class:`mmkernels.nn.QuantLinear` takes ``input_perm=perm`` and gathers
``x[..., perm]``. The GPTQ ecosystem's ``g_idx`` (the group of each original column) is
``g_idx[perm[j]] = j // group_size`` (:attr:`GPTQResult.g_idx`).

Optional grid refinements (off by default; both keep the QuantizedWeight format):
``clip_search`` picks, per row and group, the RTN grid of ``p * w`` for a shrink ``p`` in
1 ... 0.7 minimising ``sum_k H_kk (w_k - w_hat_k)^2`` (the clipped "mse" grid of the authors' code,
weighted by the Hessian diagonal); ``refit_scales`` re-solves the group scales by least squares
for the final integer codes under the ``H`` metric.

Differences from the paper / its code release: the column loop runs in float64 (the paper uses
float32 on GPU; each calibration batch's ``X^T X`` is formed in float32 here too, then accumulated
in float64); the Hessian is the running *mean* of ``2 x x^T`` over calibration tokens (any positive
scale of ``H`` gives the same result, dampening being relative); the group grid is the RTN grid of
``quantize_weight`` (the reference code uses its own quantizer class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..quant.packing import QuantizedWeight, _check_config, pack_int4, qrange
from ..quant.quantize import quantize_weight


class Hessian:
    """Running ``H = 2 / n * sum_t x_t x_t^T`` (float64 ``(K, K)``) over calibration rows ``x_t``
    of a linear layer's input. :meth:`add` takes ``(..., K)`` tensors (every leading index is one
    row); :meth:`hook` returns a forward pre-hook for ``nn.Linear``."""

    def __init__(self, in_features: int, device=None):
        self.in_features = int(in_features)
        self.H = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x2 = x.detach().reshape(-1, self.in_features)
        m = x2.shape[0]
        if m == 0:
            return
        # One batch's X^T X in float32 (as the paper's GPU code), accumulated in float64.
        x2 = x2.to(torch.float64 if x2.dtype == torch.float64 else torch.float32)
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H += (2.0 / self.n) * (x2.T @ x2).to(torch.float64)

    def hook(self):
        def pre_hook(module, args):
            self.add(args[0])

        return pre_hook


@dataclass
class GPTQResult:
    """``qweight``: the QuantizedWeight (over permuted columns when ``perm`` is set);
    ``perm``: int64 ``(K,)`` column order (``desc_act``) or ``None``; ``dead``: bool ``(K,)``
    columns that saw no input (quantized as zeros); ``latent``: float64 ``(N, K)`` (stored column
    order) the values GPTQ rounded, i.e. each column as updated by the errors of the columns before
    it, so that ``q = clamp(round(latent / s) + z)`` (the start point of
    :mod:`mmkernels.compress.signround`)."""

    qweight: QuantizedWeight
    perm: Optional[Tensor]
    dead: Tensor
    latent: Optional[Tensor] = None

    @property
    def g_idx(self) -> Tensor:
        """Group index of each *original* input column: ``g_idx[perm[j]] = j // group_size``
        (``0`` everywhere per channel)."""
        k = self.qweight.in_features
        gs = self.qweight.group_size or k
        stored = torch.arange(k, device=self.dead.device) // gs
        if self.perm is None:
            return stored
        g = torch.empty_like(stored)
        g[self.perm] = stored
        return g


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    bits: int = 4,
    group_size: Optional[int] = 128,
    symmetric: bool = True,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    desc_act: bool = False,
    clip_search: bool = False,
    refit_scales: bool = False,
) -> GPTQResult:
    """GPTQ-quantize ``w (N, K)`` given the input Hessian ``H (K, K)`` (e.g. ``Hessian.H``).

    ``bits`` 8 / 4, ``group_size`` None / 32 / 64 / 128, ``symmetric`` as in
    :func:`quantize_weight`. ``percdamp``: dampening as a fraction of ``mean(diag(H))``.
    ``block_size``: columns per lazy-update block. ``desc_act``: activation order (see the module
    docstring). ``clip_search`` and ``refit_scales``: the two optional grid refinements described
    in the module docstring (off: the exact RTN grid). Raises ``torch.linalg.LinAlgError`` only if
    ``H`` is not positive semi-definite
    even after dampening (e.g. contains NaN).
    """
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a floating (N, K) tensor, got {getattr(w, 'shape', w)!r}")
    n, k = w.shape
    _check_config(bits, group_size, k)
    if not isinstance(H, Tensor) or tuple(H.shape) != (k, k):
        raise ValueError(f"H must be a (K, K) = ({k}, {k}) tensor, got {getattr(H, 'shape', H)!r}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be positive, got {percdamp!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    W = w.detach().to(torch.float64).clone()
    H = H.detach().to(torch.float64, copy=True).to(W.device)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]

    H.diagonal().add_(percdamp * torch.diag(H).mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    gs = group_size or k
    if group_size is not None:
        block_size = -(-block_size // gs) * gs
    qmin, qmax = qrange(bits, symmetric)
    Q = torch.empty_like(W)
    latent = torch.empty_like(W)
    scales = torch.empty(n, k // gs, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n, k // gs, dtype=torch.float64, device=W.device)
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err = torch.empty_like(W1)
        Ub = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a group starts: grid from the updated weights
                g = col // gs
                src = W1[:, i : i + gs] if group_size is not None else W
                scale, zero = (
                    _clipped_grid(src, bits, symmetric, torch.diag(H)[col : col + gs])
                    if clip_search
                    else _rtn_grid(src, bits, symmetric)
                )
                scales[:, g] = scale
                zeros[:, g] = zero
            s64 = scale.to(torch.float64)
            latent[:, col] = W1[:, i]
            q = torch.clamp(torch.round(W1[:, i] / s64) + zero, qmin, qmax)
            Q[:, col] = q
            err = (W1[:, i] - (q - zero) * s64) / Ub[i, i]
            W1[:, i:] -= err[:, None] * Ub[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]  # lazy batch update of the later blocks

    if refit_scales:
        w0 = w.detach().to(torch.float64)
        w0 = w0[:, perm] if perm is not None else w0
        w0[:, dead if perm is None else dead[perm]] = 0.0
        scales = _refit_scales(w0, H, Q - _expand(zeros, gs), scales)
    return GPTQResult(_pack(Q, scales, None if symmetric else zeros, bits, group_size), perm, dead, latent)


def _rtn_grid(cols: Tensor, bits: int, symmetric: bool):
    """Scale (float32 ``(N,)``) and zero point (float64 ``(N,)``, 0 if symmetric) that
    :func:`quantize_weight` gives these columns as one group: the same grid, by construction."""
    qw = quantize_weight(cols, bits=bits, group_size=None, symmetric=symmetric)
    zero = (
        qw.zeros[:, 0].to(torch.float64)
        if qw.zeros is not None
        else torch.zeros(cols.shape[0], dtype=torch.float64, device=cols.device)
    )
    return qw.scales[:, 0], zero


def _clipped_grid(
    cols: Tensor, bits: int, symmetric: bool, hdiag: Tensor, shrinks=tuple(1.0 - 0.025 * i for i in range(13))
):
    """The RTN grid of ``cols * p`` for the shrink ``p`` in ``shrinks`` (1 ... 0.7) that minimises
    each row's ``sum_k H_kk (w_k - w_hat_k)^2`` (clipping the range: the ``mse`` grid option of the
    GPTQ authors' code, weighted by the Hessian diagonal here)."""
    qmin, qmax = qrange(bits, symmetric)
    best_err = best_scale = best_zero = None
    for p in shrinks:
        scale, zero = _rtn_grid(cols * p, bits, symmetric)
        s64 = scale.to(torch.float64)[:, None]
        q = torch.clamp(torch.round(cols / s64) + zero[:, None], qmin, qmax)
        err = (((q - zero[:, None]) * s64 - cols) ** 2 * hdiag[None, :]).sum(dim=1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _expand(zeros: Tensor, gs: int) -> Tensor:
    return zeros.repeat_interleave(gs, dim=1)


def _refit_scales(w: Tensor, H: Tensor, C: Tensor, scales: Tensor) -> Tensor:
    """Given the integer codes ``C = q - z`` (float64 ``(N, K)``), the scales ``s (N, G)`` that
    minimise each row's output error ``(w - w_hat) H (w - w_hat)^T`` with ``w_hat = C * s`` (per
    group), by least squares (a ``G x G`` system per row). Rows where the solution is not
    positive, finite, or not better are left as they were."""
    n, k = C.shape
    g = scales.shape[1]
    gs = k // g
    member = torch.arange(k, device=C.device) // gs  # group of each column
    A = torch.empty(n, g, g, dtype=torch.float64, device=C.device)
    for h in range(g):
        Ph = (C * (member == h)[None, :]) @ H  # rows of H c_h
        A[:, :, h] = (C * Ph).reshape(n, g, gs).sum(dim=2)
    b = (C * (w @ H)).reshape(n, g, gs).sum(dim=2)
    old = scales.to(torch.float64)
    new = torch.linalg.solve(A + 1e-12 * torch.eye(g, dtype=A.dtype, device=A.device), b)
    new = new.to(torch.float32).to(torch.float64)  # what will be stored

    def objective(s):  # up to a constant
        return (s[:, None, :] @ A @ s[:, :, None]).flatten() - 2 * (b * s).sum(dim=1)

    ok = torch.isfinite(new).all(dim=1) & (new > 0).all(dim=1) & (objective(new) < objective(old))
    return torch.where(ok[:, None], new, old).to(torch.float32)


def _pack(Q: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: Optional[int]) -> QuantizedWeight:
    n, k = Q.shape
    symmetric = zeros is None
    if bits == 4:
        qweight = pack_int4(Q.to(torch.int16))
    else:
        qweight = Q.to(torch.int8 if symmetric else torch.uint8)
    return QuantizedWeight(
        qweight, scales, None if symmetric else zeros.to(torch.uint8), bits=bits, group_size=group_size, shape=(n, k)
    )
