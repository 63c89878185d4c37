"""Quantized weight format: :class:`QuantizedWeight` and the packing helpers it uses.

A linear layer's weight ``W (N, K)`` (``N`` output channels, ``K`` input features, the layout of
``nn.Linear.weight``) is stored as integers ``q``, float32 scales ``s`` and, for asymmetric
quantization, integer zero points ``z``. Groups run along ``K``: group ``g`` of row ``n`` holds
columns ``[g * group_size, (g + 1) * group_size)``; ``group_size=None`` means one group per output
channel (equivalent to ``group_size = K``). With ``G = K / group_size`` (``G = 1`` per channel)::

    W_hat[n, k] = (q[n, k] - z[n, k // group_size]) * s[n, k // group_size]     (z = 0 if symmetric)

computed as an exact integer subtraction, then one float32 multiplication (float64 when
``dtype=torch.float64`` is asked for).

Buffers (all contiguous, row-major)

=============  ===============  =========  ==================================================
buffer         bits=8           bits=4     meaning
=============  ===============  =========  ==================================================
``qweight``    (N, K)           (N, K/2)   sym int8: int8 in [-128, 127];
                                           asym int8: uint8 in [0, 255];
                                           int4 (both): uint8, two values per byte (below)
``scales``     float32 (N, G)   same       per-group scale (``G = 1`` per channel)
``zeros``      uint8 (N, G)     same       asymmetric only: zero point in [0, 2^bits - 1];
                                           ``None`` (absent from the state dict) if symmetric
``meta``       int64 (6,)       same       ``[bits, group_size or 0, N, K, symmetric, fp8]``, so
                                           a state dict describes itself (safetensors-friendly)
=============  ===============  =========  ==================================================

fp8 (``fp8=True``, GPU kernels; the reference runs anywhere): ``qweight`` is
``torch.float8_e4m3fn (N, K)`` (OCP e4m3: 4 exponent bits, 3 mantissa bits, max 448, no infinities),
symmetric, no zero points, scales float32 ``(N, G)`` (per channel or per group), and
``W_hat = float32(qweight) * s``.

int4 packing: byte ``j`` of row ``n`` (``qweight[n, j]``) holds element ``2j`` in its LOW nibble
(bits 0-3) and element ``2j + 1`` in its HIGH nibble (bits 4-7)::

    qweight[n, j] = (q[n, 2j] & 0xF) | ((q[n, 2j + 1] & 0xF) << 4)

Symmetric int4 values lie in [-8, 7] and are stored as 4-bit two's complement (``-1 -> 0xF``,
``-8 -> 0x8``); a nibble ``v`` reads back as ``v - 16 if v >= 8 else v``. Asymmetric int4 values are
unsigned in [0, 15] with an integer zero point per group. ``K`` must be even for int4; groups never
split a byte (group sizes are even).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

VALID_BITS = (8, 4)
VALID_GROUP_SIZES = (None, 32, 64, 128)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def qrange(bits: int, symmetric: bool) -> Tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of the stored values."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


# ---------------------------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------------------------


def pack_int4(q: Tensor) -> Tensor:
    """Pack integer values ``q (..., K)`` (in [-8, 7] or [0, 15]; K even) into uint8 ``(..., K/2)``:
    element ``2j`` in the low nibble of byte ``j``, element ``2j + 1`` in the high nibble."""
    if q.is_floating_point() or q.is_complex():
        raise TypeError(f"pack_int4: q must be an integer tensor, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got shape {tuple(q.shape)}")
    v = q.to(torch.int16) & 0xF  # two's complement nibble for negatives
    low, high = v[..., 0::2], v[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor, signed: bool) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., K/2)`` -> int8 ``(..., K)`` in [-8, 7] if
    ``signed`` else uint8 in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: packed must be uint8, got {packed.dtype}")
    low = packed & 0xF
    high = packed >> 4
    out = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        out = out.to(torch.int8)
        out = out - (out >= 8).to(torch.int8) * 16
    return out


# ---------------------------------------------------------------------------------------------
# Functional (tensor-level) form, used by the custom op and the reference backend
# ---------------------------------------------------------------------------------------------


def is_fp8(qweight: Tensor) -> bool:
    return qweight.dtype == FP8_DTYPE


def unpack_weight(qweight: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Stored integers as an int32 ``(N, K)`` tensor (zero points not yet subtracted)."""
    if is_fp8(qweight):
        raise TypeError("unpack_weight: an fp8 weight holds floats, not integers")
    if bits == 4:
        return unpack_int4(qweight, signed=symmetric).to(torch.int32)
    return qweight.to(torch.int32)


def centered_weight(qweight: Tensor, zeros: Optional[Tensor], bits: int) -> Tensor:
    """``q - z`` as int32 ``(N, K)`` (``z`` broadcast over each group)."""
    q = unpack_weight(qweight, bits, zeros is None)
    if zeros is None:
        return q
    n, k = q.shape
    g = zeros.shape[1]
    return (q.reshape(n, g, k // g) - zeros.to(torch.int32)[:, :, None]).reshape(n, k)


def dequantize_tensors(
    qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``W_hat (N, K)`` from the raw buffers (see the module docstring)."""
    math = torch.float64 if dtype == torch.float64 else torch.float32
    qc = qweight.to(math) if is_fp8(qweight) else centered_weight(qweight, zeros, bits)
    n, k = qc.shape
    g = scales.shape[1]
    w = qc.reshape(n, g, k // g).to(math) * scales.to(math)[:, :, None]
    return w.reshape(n, k).to(dtype)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class QuantizedWeight(nn.Module):
    """A quantized ``(N, K)`` weight held as buffers (see the module docstring for the layout).

    Being an ``nn.Module`` it follows its parent through ``.to(device)`` and ``state_dict()`` /
    ``load_state_dict()``. ``.to(dtype)`` / ``.half()`` leave it unchanged: scales stay float32.
    Build one with :func:`mmkernels.quant.quantize_weight`, :meth:`empty` (to load into), or
    :meth:`from_state_dict`.
    """

    def __init__(
        self,
        qweight: Tensor,
        scales: Tensor,
        zeros: Optional[Tensor],
        *,
        bits: int,
        group_size: Optional[int],
        shape: Tuple[int, int],
    ):
        super().__init__()
        n, k = (int(d) for d in shape)
        _check_config(bits, group_size, k)
        g = 1 if group_size is None else k // group_size
        symmetric = zeros is None
        fp8 = isinstance(qweight, Tensor) and is_fp8(qweight)
        if fp8:
            if bits != 8 or not symmetric:
                raise ValueError(
                    f"an fp8 (float8_e4m3fn) qweight needs bits=8 and no zero points, "
                    f"got bits={bits}, zeros={'given' if zeros is not None else None}"
                )
            qdtype = FP8_DTYPE
        else:
            qdtype = (torch.int8 if symmetric else torch.uint8) if bits == 8 else torch.uint8
        qshape = (n, k) if bits == 8 else (n, k // 2)
        _expect("qweight", qweight, qdtype, qshape)
        _expect("scales", scales, torch.float32, (n, g))
        if zeros is not None:
            _expect("zeros", zeros, torch.uint8, (n, g))
        self.bits, self.group_size, self.shape, self.symmetric = bits, group_size, (n, k), symmetric
        self.fp8 = fp8
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zeros", None if zeros is None else zeros.contiguous())
        self.register_buffer(
            "meta",
            torch.tensor(
                [bits, group_size or 0, n, k, int(symmetric), int(fp8)], dtype=torch.int64, device=qweight.device
            ),
        )

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def empty(
        cls,
        shape: Tuple[int, int],
        *,
        bits: int,
        group_size: Optional[int] = None,
        symmetric: bool = True,
        fp8: bool = False,
        device=None,
    ) -> "QuantizedWeight":
        """Zero-filled weight of the given configuration (a target for ``load_state_dict``)."""
        n, k = shape
        _check_config(bits, group_size, k)
        g = 1 if group_size is None else k // group_size
        qdtype = torch.int8 if (bits == 8 and symmetric) else torch.uint8
        if fp8:
            qdtype = FP8_DTYPE
        qk = k if bits == 8 else k // 2
        zeros = None if symmetric else torch.zeros((n, g), dtype=torch.uint8, device=device)
        return cls(
            torch.zeros((n, qk), dtype=qdtype, device=device),
            torch.ones((n, g), dtype=torch.float32, device=device),
            zeros,
            bits=bits,
            group_size=group_size,
            shape=(n, k),
        )

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, Tensor], prefix: str = "") -> "QuantizedWeight":
        """Rebuild from ``state_dict()`` output (keys ``prefix + name``); the configuration is read
        from the ``meta`` buffer."""
        try:
            meta = state_dict[prefix + "meta"]
        except KeyError:
            raise KeyError(
                f"state_dict has no {prefix + 'meta'!r}: not a QuantizedWeight state dict "
                f"(keys: {sorted(state_dict)[:8]})"
            ) from None
        values = [int(v) for v in meta.tolist()]
        if len(values) != 6:
            raise ValueError(f"{prefix}meta must hold 6 values [bits, group_size, N, K, symmetric, fp8], got {values}")
        bits, gs, n, k, sym, _ = values
        zeros = None if sym else state_dict[prefix + "zeros"]
        return cls(
            state_dict[prefix + "qweight"],
            state_dict[prefix + "scales"],
            zeros,
            bits=bits,
            group_size=gs or None,
            shape=(n, k),
        )

    # --- use ----------------------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def kernel_tensors(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(qweight, scales, zeros)``, read from the module's buffer table directly: what
        ``self.qweight`` etc. return, without ``nn.Module.__getattr__`` (~0.5 us per buffer, a
        visible share of a small qmatmul call)."""
        buffers = self._buffers
        return buffers["qweight"], buffers["scales"], buffers["zeros"]

    def int_weight(self) -> Tensor:
        """``q - z`` as int32 ``(N, K)`` (integer formats only)."""
        return centered_weight(self.qweight, self.zeros, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W_hat (N, K)`` in ``dtype`` (float32 math; float64 math for ``dtype=float64``)."""
        return dequantize_tensors(self.qweight, self.scales, self.zeros, self.bits, dtype)

    def nbytes(self) -> int:
        """Storage of qweight, scales and zeros in bytes."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def extra_repr(self) -> str:
        gs = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        if self.fp8:
            return f"shape={self.shape}, fp8 e4m3, {gs}"
        return f"shape={self.shape}, bits={self.bits}, {gs}, {'symmetric' if self.symmetric else 'asymmetric'}"

    # --- nn.Module plumbing -----------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the float32 scales; the format fixes them at float32.
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = self.scales.to(torch.float32)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        meta = state_dict.get(prefix + "meta")
        if meta is not None and meta.tolist() != self.meta.tolist():
            error_msgs.append(
                f"{prefix}meta: the checkpoint holds a quantized weight with "
                f"[bits, group_size, N, K, symmetric, fp8] = {meta.tolist()}, this "
                f"module "
                f"expects {self.meta.tolist()}"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _check_config(bits, group_size, k):
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if isinstance(group_size, bool) or group_size not in VALID_GROUP_SIZES:
        raise ValueError(f"group_size must be None (per output channel), 32, 64 or 128, got {group_size!r}")
    if k <= 0:
        raise ValueError(f"K (in_features) must be positive, got {k}")
    if group_size is not None and k % group_size:
        raise ValueError(f"group_size={group_size} must divide K (in_features) = {k}")
    if bits == 4 and k % 2:
        raise ValueError(f"bits=4 packs two values per byte along K: K (in_features) must be even, got {k}")


def _expect(name, t, dtype, shape):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be {str(dtype).replace('torch.', '')}{list(shape)}, got "
            f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
        )
