"""The GPTQ checkpoint layout (``format="gptq"``; ``"gptq_v2"`` differs only in the zero points).

What AutoGPTQ / GPTQModel, transformers' GPTQ integration and vLLM read. A directory::

    model.safetensors      per quantized Linear ``<name>``:
        <name>.qweight  int32 (K * bits / 32, N)   K packed into int32 words, 32/bits values per
                        word: row r, bits [i*bits, (i+1)*bits) hold input feature r*(32/bits) + i
                        of output column n (lowest bits first; 4-bit: 8 per word, 8-bit: 4)
        <name>.qzeros   int32 (G, N * bits / 32)   zero points packed the same way along N
        <name>.scales   float16 (G, N)             (transposed w.r.t. mmkernels' (N, G))
        <name>.g_idx    int32 (K,)                 group of each input feature
        <name>.bias     float16 (N,)               when the layer has one
      and every other tensor of the state dict (LayerNorm, unquantized Linear, ...) unchanged.
    quantize_config.json  {"bits", "group_size" (-1 = per channel), "desc_act", "sym",
                           "true_sequential", "static_groups", "checkpoint_format": "gptq",
                           "quant_method": "gptq", "meta": {"quantizer": [...]}}
    config.json           {..., "quantization_config": <the same object>}

Dequantization: ``W[n, k] = (u[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]`` with ``u`` the
unsigned stored value. **Zero points in the classic ("gptq", v1) format are stored minus one**:
the file holds ``z - 1`` and readers add 1 back; ``"gptq_v2"`` stores ``z`` itself. A v1 file cannot
hold ``z = 0`` (it would be stored as -1, i.e. all ones, and read back as ``2^bits``): saving such a
layer as ``"gptq"`` is refused with a pointer to ``"gptq_v2"``. Symmetric layers store
``u = q + 2^(bits-1)`` with ``z = 2^(bits-1)`` (v1 file: ``2^(bits-1) - 1``, e.g. 7 / 0x77777777
for 4-bit), which is what the symmetric kernels (Marlin, ExLlama) assume.

Act-order (``desc_act``): rows of ``qweight`` stay in the original input-feature order and
``g_idx[k]`` names the group of feature ``k``. mmkernels keeps groups contiguous through
``input_perm`` instead (``g_idx[perm[j]] = j // group_size``), so export writes the weight back in
original order with that ``g_idx``; import sets ``input_perm`` to a stable argsort of ``g_idx``.
That perm can order the columns *within* a group differently from the one saved; the layer is the
same (every column keeps its integer, scale and zero point; only the float summation order
differs).

Precision: scales (and biases) are stored as float16, the ecosystem's convention, so a float32
scale comes back rounded to the nearest float16 (relative error <= 2^-11); scales that are
float16-representable round-trip exactly, and ``scale_dtype=torch.float32`` keeps everything exact
(readers that copy into float16 buffers then do the rounding). A scale that would overflow or
flush to zero in float16 is refused. Integers always round-trip exactly.

Verified against (public sources, read for this module):
* AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py``: ``QuantLinear.pack`` (qweight
  rows ``|= intweight[j] << (bits * (j - i))``, ``zeros -= 1`` before packing qzeros along N,
  ``scales`` / ``bias`` float16, g_idx int32 ``i // group_size``) and its torch forward (unpack with
  shifts ``0, bits, 2 bits, ...``, ``zeros + 1``);
* the GPTQModel config constants (``quantize_config.json``, ``checkpoint_format``, ``quant_method``,
  ``meta.quantizer``) and the gptq_v2 write-up (vLLM PR 26092 analysis: v1 stores ``zero - 1``, v2
  the exact zero);
* vLLM's GPTQ loaders: ``qweight (K / pack_factor, N)`` packed along the input dim, ``scales
  (G, N)``, ``qzeros (G, N / pack_factor)``.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ...nn.quant_linear import QuantLinear
from . import _io
from .common import build_layer, layer_config, prefix, quant_layers, refuse_split_layers, unsigned_view

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANT_CONFIG_FILE = "quantize_config.json"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def save(
    model: nn.Module,
    directory: str,
    *,
    checkpoint_format: str = "gptq",
    scale_dtype: torch.dtype = torch.float16,
    config: Optional[dict] = None,
    float_dtype: Optional[torch.dtype] = None,
) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if scale_dtype not in _FLOATS:
        raise TypeError(f"scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")
    refuse_split_layers(model, checkpoint_format)
    layers = quant_layers(model)
    if not layers:
        raise ValueError("format='gptq': the model holds no QuantLinear layer to export")
    bits, group_size, sym = _common_config(layers)
    tensors: Dict[str, Tensor] = {}
    desc_act = False
    for name, layer in layers.items():
        tensors.update(_pack_layer(name, layer, checkpoint_format, scale_dtype))
        desc_act |= unsigned_view(layer).act_order
    owned = {prefix(n) + k for n, m in layers.items() for k in m.state_dict()}
    for key, value in model.state_dict().items():
        if key not in owned:
            tensors[key] = _io.cast_float(value, float_dtype)
    qc = {
        "bits": bits,
        "group_size": group_size or -1,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": checkpoint_format,
        "quant_method": "gptq",
        "meta": {"quantizer": ["mmkernels"]},
    }
    _io.save_tensors(tensors, os.path.join(directory, "model.safetensors"))
    _io.write_json(os.path.join(directory, QUANT_CONFIG_FILE), qc)
    _io.write_json(os.path.join(directory, "config.json"), {**(config or {}), "quantization_config": qc})


def _common_config(layers: Dict[str, QuantLinear]) -> Tuple[int, Optional[int], bool]:
    configs = {}
    for name, layer in layers.items():
        cfg = layer_config(layer)
        why = (
            "fp8 weights"
            if cfg["fp8"]
            else "act_bits=8 (W8A8)"
            if cfg["act_bits"]
            else "SmoothQuant factors (smooth)"
            if cfg["smooth"]
            else f"bits={cfg['bits']}"
            if cfg["bits"] not in (4, 8)
            else None
        )
        if why:
            raise ValueError(
                f"format='gptq' cannot hold layer {name!r}: it uses {why}, which the "
                f"GPTQ layout has no field for; use format='mmkernels' (or "
                f"'compressed-tensors' for W8A8 / fp8 without smoothing)"
            )
        configs.setdefault((cfg["bits"], cfg["group_size"], cfg["symmetric"]), []).append(name)
    if len(configs) > 1:
        seen = "; ".join(
            f"bits={b}, group_size={g}, symmetric={s}: {names[:4]}" for (b, g, s), names in configs.items()
        )
        raise ValueError(
            f"format='gptq' stores one bits / group_size / sym for the whole model, "
            f"but the layers differ ({seen}); use format='compressed-tensors' or "
            f"'mmkernels' for mixed configurations"
        )
    return next(iter(configs))


def _pack_layer(name: str, layer: QuantLinear, checkpoint_format: str, scale_dtype: torch.dtype) -> Dict[str, Tensor]:
    qw = layer.quantized
    bits, (n, k) = qw.bits, qw.shape
    per = 32 // bits
    if k % per or n % per:
        raise ValueError(
            f"format='gptq': layer {name!r} has (N, K) = ({n}, {k}); the GPTQ layout "
            f"packs {per} values per int32 along both K and N, so both must be "
            f"multiples of {per}"
        )
    view = unsigned_view(layer)
    zeros = view.zeros if view.zeros is not None else torch.full_like(view.scales, 1 << (bits - 1), dtype=torch.int64)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise ValueError(
                f"format='gptq': layer {name!r} has zero points equal to 0, which "
                f"the v1 GPTQ layout (it stores zero - 1) cannot hold; save with "
                f"format='gptq_v2' (stores the exact zero point) or "
                f"format='mmkernels'"
            )
        zeros = zeros - 1
    p = prefix(name)
    out = {
        p + "qweight": _io.pack_int32(view.u.T, bits, dim=0),
        p + "qzeros": _io.pack_int32(zeros.T, bits, dim=1),
        p + "scales": _cast_checked(view.scales.T, scale_dtype, f"layer {name!r} scales"),
        p + "g_idx": view.g_idx.to(torch.int32),
    }
    if layer.bias is not None:
        out[p + "bias"] = _cast_checked(layer.bias.detach().cpu(), scale_dtype, f"layer {name!r} bias")
    return out


def _cast_checked(t: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    c = t.to(dtype)
    bad = ~torch.isfinite(c) | ((c == 0) & (t != 0))
    if bool(bad.any()):
        v = t[bad].flatten()[0].item()
        raise ValueError(
            f"format='gptq': {what} hold {v!r}, which {dtype} cannot represent "
            f"(overflow or flush to zero); pass scale_dtype=torch.float32"
        )
    return c.contiguous()


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def read_config(directory: str) -> Tuple[dict, str]:
    path = os.path.join(directory, QUANT_CONFIG_FILE)
    if os.path.isfile(path):
        return _io.read_json(path), path
    path = os.path.join(directory, "config.json")
    qc = _io.read_json(path).get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: no 'quantization_config' object (and no {QUANT_CONFIG_FILE})")
    return qc, path


def load(directory: str) -> Tuple[Dict[str, QuantLinear], Dict[str, Tensor], dict]:
    qc, where = read_config(directory)
    method = qc.get("quant_method", "gptq")
    fmt = qc.get("checkpoint_format", "gptq")
    bits, gs, sym = qc.get("bits"), qc.get("group_size", -1), qc.get("sym", True)
    if method != "gptq" or fmt not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"{where}: quant_method={method!r}, checkpoint_format={fmt!r}; this "
            f"reader handles quant_method 'gptq' with checkpoint_format "
            f"{CHECKPOINT_FORMATS}"
        )
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"{where}: bits={bits!r}; mmkernels reads 4- and 8-bit GPTQ checkpoints")
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs != -1 and gs <= 0):
        raise ValueError(f"{where}: group_size={gs!r}; expected -1 (per channel) or a positive integer")
    if not isinstance(sym, bool):
        raise ValueError(f"{where}: sym={sym!r}; expected true or false")
    weights = os.path.join(directory, "model.safetensors")
    tensors = _io.load_checkpoint_tensors(directory)
    names = sorted(k[: -len("qweight")].rstrip(".") for k in tensors if k == "qweight" or k.endswith(".qweight"))
    if not names:
        raise ValueError(f"{weights}: no '<layer>.qweight' tensor: not a GPTQ checkpoint")
    layers, claimed = {}, set()
    for name in names:
        layers[name], keys = _unpack_layer(name, tensors, bits, gs, sym, fmt, f"{weights} (layer {name!r})")
        claimed |= keys
    info = {"format": "gptq", "quantization_config": qc}
    return layers, {k: v for k, v in tensors.items() if k not in claimed}, info


def _unpack_layer(name, tensors, bits, gs, sym, fmt, where):
    p, per = prefix(name), 32 // bits
    qweight = _io.expect_tensor(tensors, p + "qweight", where, [torch.int32], (None, None))
    k, n = qweight.shape[0] * per, qweight.shape[1]
    g = 1 if gs == -1 else -(-k // gs)
    if gs != -1 and k % gs:
        raise ValueError(f"{where}: group_size={gs} does not divide K = {k}")
    qzeros = _io.expect_tensor(tensors, p + "qzeros", where, [torch.int32], (g, n // per))
    if n % per:
        raise ValueError(f"{where}: N = {n} is not a multiple of {per} (qzeros packing)")
    scales = _io.expect_tensor(tensors, p + "scales", where, _FLOATS, (g, n))
    keys = {p + "qweight", p + "qzeros", p + "scales"}
    g_idx = None
    if p + "g_idx" in tensors:
        g_idx = _io.expect_tensor(tensors, p + "g_idx", where, [torch.int32, torch.int64], (k,))
        keys.add(p + "g_idx")
        if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= g):
            raise ValueError(
                f"{where}: g_idx values must lie in [0, {g}), got [{int(g_idx.min())}, {int(g_idx.max())}]"
            )
    bias = None
    if p + "bias" in tensors:
        bias = _io.expect_tensor(tensors, p + "bias", where, _FLOATS, (n,))
        keys.add(p + "bias")
    u = _io.unpack_int32(qweight, bits, dim=0).T
    z = _io.unpack_int32(qzeros, bits, dim=1).T
    if fmt == "gptq":
        z = z + 1
    half = 1 << (bits - 1)
    if sym:
        if bool((z != half).any()):
            raise ValueError(
                f"{where}: sym=true but qzeros decode to zero points "
                f"{sorted(set(z.unique().tolist()))[:6]} (expected all {half}; "
                f"checkpoint_format={fmt!r})"
            )
        z = None
    elif bool((z >= (1 << bits)).any()):
        raise ValueError(
            f"{where}: qzeros decode to a zero point of {1 << bits} "
            f"(stored {(1 << bits) - 1} in a v1 'gptq' checkpoint, i.e. a zero "
            f"point of 0 written as -1); its weights cannot be decoded reliably"
        )
    layer = build_layer(
        u,
        z,
        scales.to(torch.float32).T.contiguous(),
        None if g_idx is None else g_idx.to(torch.int64),
        bits=bits,
        bias=bias,
        act_bits=None,
        where=where,
        group_size=None if gs == -1 else gs,
    )
    return layer, keys
