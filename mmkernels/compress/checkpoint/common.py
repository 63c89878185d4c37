"""Format-neutral view of a :class:`~mmkernels.nn.QuantLinear`, shared by the exporters.

The GPTQ and compressed-tensors layouts both describe a layer by *unsigned* integers in the
*original* column order plus a per-column group index::

    W_hat[n, k] = (u[n, k] - zu[n, g_idx[k]]) * s[n, g_idx[k]]

with ``u, zu`` in ``[0, 2^bits)`` (symmetric layers: ``u = q + 2^(bits-1)``, ``zu = 2^(bits-1)``).
:func:`unsigned_view` turns a QuantLinear into that form (undoing ``input_perm``) and
:func:`build_layer` turns it back (deriving ``input_perm`` from ``g_idx``).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ...nn.quant_linear import QuantLinear
from ...nn.split_linear import OutlierSplitLinear
from ...quant.packing import QuantizedWeight, pack_int4, unpack_weight


class UnsignedView(NamedTuple):
    u: Tensor  # int64 (N, K), original column order, in [0, 2^bits)
    zeros: Optional[Tensor]  # int64 (N, G) in [0, 2^bits); None if symmetric (2^(bits-1))
    scales: Tensor  # float32 (N, G)
    g_idx: Tensor  # int64 (K,): group of each original column
    act_order: bool  # g_idx is not the plain ``k // group_size``


def quant_layers(model: nn.Module) -> Dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def split_layers(model: nn.Module) -> Dict[str, OutlierSplitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, OutlierSplitLinear)}


def refuse_split_layers(model: nn.Module, fmt: str) -> None:
    """The GPTQ and compressed-tensors layouts have no way to say "these input channels go through
    a second GEMM": refuse rather than write a checkpoint other tools would misread."""
    splits = split_layers(model)
    if splits:
        raise ValueError(
            f"format={fmt!r} cannot express OutlierSplitLinear layers "
            f"({sorted(splits)[:4]}: input channels split over two int8 GEMMs, from "
            f"quantize_model(outlier_channels=...)); save them with "
            f"format='mmkernels', or quantize without outlier_channels"
        )


def prefix(name: str) -> str:
    return f"{name}." if name else ""


def layer_config(layer: QuantLinear) -> dict:
    """The JSON-able configuration of a QuantLinear (what its empty twin is built from)."""
    qw = layer.quantized
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bits": qw.bits,
        "group_size": qw.group_size,
        "symmetric": qw.symmetric,
        "fp8": qw.fp8,
        "act_bits": layer.act_bits,
        "bias": layer.bias is not None,
        "smooth": layer.smooth is not None,
        "input_perm": layer.input_perm is not None,
    }


def default_g_idx(k: int, group_size: Optional[int]) -> Tensor:
    return torch.arange(k, dtype=torch.int64) // (group_size or k)


def unsigned_view(layer: QuantLinear) -> UnsignedView:
    """Integer layers only (fp8 holds floats)."""
    qw = layer.quantized
    n, k = qw.shape
    half = 1 << (qw.bits - 1)
    q = unpack_weight(qw.qweight.cpu(), qw.bits, qw.symmetric).to(torch.int64)
    u = q + half if qw.symmetric else q
    zeros = None if qw.symmetric else qw.zeros.cpu().to(torch.int64)
    g_idx = default_g_idx(k, qw.group_size)
    act_order = False
    if layer.input_perm is not None:
        perm = layer.input_perm.cpu()
        inv = torch.argsort(perm)
        u = u[:, inv]  # stored column j is original column perm[j]
        g_stored = g_idx
        g_idx = torch.empty_like(g_stored)
        g_idx[perm] = g_stored  # g_idx[perm[j]] = j // group_size
        act_order = qw.group_size is not None and not torch.equal(g_idx, default_g_idx(k, qw.group_size))
    return UnsignedView(u.contiguous(), zeros, qw.scales.detach().cpu().to(torch.float32), g_idx, act_order)


def perm_from_g_idx(g_idx: Tensor, group_size: Optional[int], where: str) -> Optional[Tensor]:
    """The ``input_perm`` serving ``g_idx`` (a stable argsort), or ``None`` when ``g_idx`` is the
    plain ``k // group_size``. Refuses a ``g_idx`` whose groups are not all ``group_size`` long."""
    k = g_idx.numel()
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, default_g_idx(k, group_size)):
        return None
    gs = group_size or k
    counts = torch.bincount(g_idx.clamp(min=0), minlength=k // gs)
    if int(g_idx.min()) < 0 or counts.numel() != k // gs or bool((counts != gs).any()):
        raise ValueError(
            f"{where}: g_idx must give every one of the {k // gs} groups exactly "
            f"{gs} columns (group sizes seen: {sorted(set(counts.tolist()))}); "
            f"mmkernels stores act-order groups as contiguous runs"
        )
    return torch.argsort(g_idx, stable=True)


def build_layer(
    u: Tensor,
    zeros: Optional[Tensor],
    scales: Tensor,
    g_idx: Optional[Tensor],
    *,
    bits: int,
    bias: Optional[Tensor],
    act_bits: Optional[int],
    where: str,
    group_size: Optional[int] = None,
) -> QuantLinear:
    """A QuantLinear from unsigned integers ``u (N, K)`` in original column order (see the module
    docstring); ``zeros=None`` means symmetric (zero point ``2^(bits-1)``). ``group_size``: the
    recorded one (kept when it equals K); by default derived from the scales."""
    n, k = u.shape
    g = scales.shape[1]
    if g < 1 or k % g:
        raise ValueError(f"{where}: {g} scale groups do not divide K = {k}")
    if group_size is None or g * group_size != k:
        group_size = None if g == 1 else k // g
    perm = None if g_idx is None else perm_from_g_idx(g_idx, group_size, where)
    if perm is not None:
        u = u[:, perm]
    half = 1 << (bits - 1)
    try:
        if zeros is None:
            q = u - half
            qweight = pack_int4(q.to(torch.int16)) if bits == 4 else q.to(torch.int8)
            zq = None
        else:
            if int(zeros.min()) < 0 or int(zeros.max()) >= (1 << bits):
                raise ValueError(
                    f"zero points must lie in [0, {(1 << bits) - 1}], got [{int(zeros.min())}, {int(zeros.max())}]"
                )
            qweight = pack_int4(u.to(torch.int16)) if bits == 4 else u.to(torch.uint8)
            zq = zeros.to(torch.uint8)
        qw = QuantizedWeight(
            qweight.contiguous(),
            scales.to(torch.float32).contiguous(),
            zq,
            bits=bits,
            group_size=group_size,
            shape=(n, k),
        )
        return QuantLinear.from_quantized(qw, bias, act_bits=act_bits, input_perm=perm)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot build a QuantLinear: {e}") from None
