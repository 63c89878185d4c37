"""The compressed-tensors layout (``format="compressed-tensors"``), as llm-compressor writes and
vLLM / transformers read it. A directory with ``model.safetensors`` and ``config.json``.

Per quantized Linear ``<name>``, by the layer's ``format``:

``pack-quantized`` (int4 / int8 weight-only)::

    <name>.weight_packed      int32 (N, K * bits / 32)  signed values q are offset to unsigned
                              (q + 2^(bits-1)) and packed along K, 32/bits per word, lowest bits
                              first (value i of a word in bits [i*bits, (i+1)*bits))
    <name>.weight_shape       int64 [N, K]
    <name>.weight_scale       (N, G) in the model's float dtype (G = 1: strategy "channel")
    <name>.weight_zero_point  int32 (N * bits / 32, G)  asymmetric only: signed zero points,
                              offset the same way and packed along N (dim 0)
    <name>.weight_g_idx       int32 (K,)                 act-order ("actorder": "group") only

``int-quantized`` (W8A8: int8 weights, dynamic per-token int8 activations)::

    <name>.weight             int8 (N, K)       signed values (asymmetric: u - 128)
    <name>.weight_scale       (N, 1)
    <name>.weight_zero_point  int8 (N, 1)       asymmetric only (z - 128)

``float-quantized`` (fp8 e4m3 weights, weight-only or with dynamic per-token fp8 activations)::

    <name>.weight             float8_e4m3fn (N, K)
    <name>.weight_scale       (N, G)

and ``<name>.bias`` plus every non-quantized tensor unchanged. ``config.json``::

    {"quantization_config": {"quant_method": "compressed-tensors", "format": <format or
      "mixed-precision">, "quantization_status": "compressed",
      "config_groups": {"group_0": {"targets": ["Linear"] (or the layer names when layers differ),
          "format": ..., "weights": {"num_bits", "type": "int" | "float", "symmetric",
          "strategy": "group" | "channel", "group_size", "actorder": "group" | null,
          "dynamic": false}, "input_activations": null | {"num_bits": 8, "type", "symmetric": true,
          "strategy": "token", "dynamic": true}, "output_activations": null}},
      "ignore": [Linear layers left in float]}}

compressed-tensors' integer range is signed for both symmetric and asymmetric schemes
(``[-2^(bits-1), 2^(bits-1) - 1]``, zero points in the same range) and dequantizes
``(x_q - zero_point) * scale``; mmkernels' asymmetric values are unsigned (``[0, 2^bits)``), so
``x_q = u - 2^(bits-1)`` and ``zero_point = z - 2^(bits-1)``; after the packing offset the packed
nibbles are exactly mmkernels' unsigned ``u`` / ``z``.

Activations: the checkpoint only says "dynamic, per token, symmetric, 8 bit". vLLM's runtime
computes ``scale = max|x| / 127`` per token like mmkernels (compressed-tensors' own Python
reference divides by 127.5); the file does not fix this.

Import also accepts per-tensor weight scales (``strategy: "tensor"``, expanded to per channel, which
is exact) and sharded checkpoints; static activation scales, block / tensor-group strategies and
other formats are refused with an error.

Verified against (public sources): compressed-tensors ``compressors/pack_quantized/helpers.py``
(``pack_to_int32``: ``value + (1 << (num_bits - 1))``, dense low-bits-first packing,
``packed_dim=0`` for zero points), ``compressors/pack_quantized/base.py`` (``weight_packed``,
``weight_shape``, zero points packed only for asymmetric group / channel strategies),
``compressors/naive_quantized/base.py`` (int- / float-quantized keep ``weight`` in the quantized
dtype), ``quantization/utils/helpers.py`` (``calculate_range``: signed range for INT, also when
asymmetric); vLLM ``compressed_tensors_wNa16.py`` (``weight_packed (N, K / pack_factor)``,
``weight_scale (N, G)``, ``weight_zero_point (N / pack_factor, G)``, ``weight_g_idx`` int32,
``weight_shape`` int64[2]).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ...nn.quant_linear import QuantLinear
from ...quant.packing import FP8_DTYPE, QuantizedWeight
from . import _io
from .common import (
    build_layer,
    default_g_idx,
    perm_from_g_idx,
    prefix,
    quant_layers,
    refuse_split_layers,
    unsigned_view,
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def save(
    model: nn.Module,
    directory: str,
    *,
    scale_dtype: Optional[torch.dtype] = None,
    config: Optional[dict] = None,
    float_dtype: Optional[torch.dtype] = None,
) -> None:
    refuse_split_layers(model, "compressed-tensors")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("format='compressed-tensors': the model holds no QuantLinear to export")
    scale_dtype = scale_dtype or _model_float_dtype(model, layers)
    if scale_dtype not in _FLOATS:
        raise TypeError(f"scale_dtype must be float32, float16 or bfloat16, got {scale_dtype}")
    tensors: Dict[str, Tensor] = {}
    schemes: Dict[str, list] = {}
    for name, layer in layers.items():
        scheme, layer_tensors = _export_layer(name, layer, scale_dtype)
        tensors.update(layer_tensors)
        schemes.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
    owned = {prefix(n) + k for n, m in layers.items() for k in m.state_dict()}
    for key, value in model.state_dict().items():
        if key not in owned:
            tensors[key] = _io.cast_float(value, float_dtype)
    groups = {}
    for i, (scheme_json, names) in enumerate(schemes.items()):
        scheme = json.loads(scheme_json)
        scheme["targets"] = ["Linear"] if len(schemes) == 1 else names
        groups[f"group_{i}"] = scheme
    formats = {g["format"] for g in groups.values()}
    ignore = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    qc = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    _io.save_tensors(tensors, os.path.join(directory, "model.safetensors"))
    _io.write_json(os.path.join(directory, "config.json"), {**(config or {}), "quantization_config": qc})


def _model_float_dtype(model: nn.Module, layers) -> torch.dtype:
    """The dtype of the model's float tensors outside the quantized weights (float32 if none)."""
    owned = {prefix(n) + "quantized." + k for n, m in layers.items() for k in m.quantized.state_dict()}
    owned |= {prefix(n) + "smooth" for n in layers}
    dtypes = [v.dtype for k, v in model.state_dict().items() if k not in owned and v.is_floating_point()]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def _export_layer(name: str, layer: QuantLinear, scale_dtype: torch.dtype):
    qw = layer.quantized
    n, k = qw.shape
    p = prefix(name)
    if layer.smooth is not None:
        raise ValueError(
            f"format='compressed-tensors' cannot hold layer {name!r}: its SmoothQuant "
            f"factors (smooth) have no field in the layout (llm-compressor folds them "
            f"into the preceding norm); use format='mmkernels'"
        )
    strategy = "channel" if qw.group_size is None else "group"
    weights = {
        "num_bits": qw.bits,
        "type": "float" if qw.fp8 else "int",
        "symmetric": qw.symmetric,
        "strategy": strategy,
        "group_size": qw.group_size,
        "dynamic": False,
        "actorder": None,
    }
    act = None
    if layer.act_bits:
        act = {
            "num_bits": 8,
            "type": "float" if qw.fp8 else "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        }
    out: Dict[str, Tensor] = {p + "weight_scale": qw.scales.detach().cpu().to(scale_dtype)}
    if qw.fp8:
        fmt = "float-quantized"
        w = qw.qweight.detach().cpu()
        g_idx = default_g_idx(k, qw.group_size)
        if layer.input_perm is not None:
            perm = layer.input_perm.cpu()
            w = w[:, torch.argsort(perm)]
            g_idx = torch.empty_like(g_idx).index_copy_(0, perm, g_idx)
        out[p + "weight"] = w.contiguous()
        act_order = qw.group_size is not None and not torch.equal(g_idx, default_g_idx(k, qw.group_size))
    else:
        view = unsigned_view(layer)
        half = 1 << (qw.bits - 1)
        g_idx, act_order = view.g_idx, view.act_order
        if layer.act_bits:
            fmt = "int-quantized"
            out[p + "weight"] = (view.u - half).to(torch.int8)
            if view.zeros is not None:
                out[p + "weight_zero_point"] = (view.zeros - half).to(torch.int8)
        else:
            fmt = "pack-quantized"
            per = 32 // qw.bits
            if k % per or (view.zeros is not None and n % per):
                raise ValueError(
                    f"format='compressed-tensors': layer {name!r} has (N, K) = "
                    f"({n}, {k}); pack-quantized packs {per} values per int32 along "
                    f"K (and along N for zero points): they must be multiples of "
                    f"{per}"
                )
            out[p + "weight_packed"] = _io.pack_int32(view.u, qw.bits, dim=1)
            out[p + "weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            if view.zeros is not None:
                out[p + "weight_zero_point"] = _io.pack_int32(view.zeros, qw.bits, dim=0)
    if act_order:
        weights["actorder"] = "group"
        out[p + "weight_g_idx"] = g_idx.to(torch.int32)
    if layer.bias is not None:
        out[p + "bias"] = layer.bias
    scheme = {"format": fmt, "weights": weights, "input_activations": act, "output_activations": None}
    return scheme, out


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def read_config(directory: str) -> Tuple[dict, str]:
    path = os.path.join(directory, "config.json")
    qc = _io.read_json(path).get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: no 'quantization_config' object")
    return qc, path


def load(directory: str) -> Tuple[Dict[str, QuantLinear], Dict[str, Tensor], dict]:
    qc, where = read_config(directory)
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{where}: quant_method is {qc.get('quant_method')!r}, expected 'compressed-tensors'")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(
            f"{where}: quantization_status is {status!r}; only 'compressed' checkpoints hold quantized tensors"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: 'config_groups' must be a non-empty object")
    weights_path = os.path.join(directory, "model.safetensors")
    tensors = _io.load_checkpoint_tensors(directory)
    names = sorted(
        k[: -len("weight_scale")].rstrip(".") for k in tensors if k == "weight_scale" or k.endswith(".weight_scale")
    )
    if not names:
        raise ValueError(f"{weights_path}: no '<layer>.weight_scale' tensor: no quantized layer")
    ignore = qc.get("ignore") or []
    layers, claimed = {}, set()
    for name in names:
        if any(_matches(name, t) for t in ignore if t != "Linear"):
            raise ValueError(f"{where}: layer {name!r} holds quantized tensors but is listed in 'ignore'")
        scheme = _scheme_for(name, groups, where)
        fmt = scheme.get("format") or qc.get("format")
        lw = f"{weights_path} (layer {name!r})"
        layers[name], keys = _import_layer(name, scheme, fmt, tensors, lw, where)
        stray = [
            k for k in tensors if k.startswith(prefix(name)) and k not in keys and "." not in k[len(prefix(name)) :]
        ]
        if stray:
            raise ValueError(
                f"{lw}: tensors {stray} are not part of a {fmt} layer of this scheme "
                f"(static activation scales are not supported)"
            )
        claimed |= keys
    info = {"format": "compressed-tensors", "quantization_config": qc}
    return layers, {k: v for k, v in tensors.items() if k not in claimed}, info


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _scheme_for(name: str, groups: dict, where: str) -> dict:
    """Exact layer name beats a regex, which beats a class name ("Linear")."""
    best, rank = None, 0
    for gname, group in groups.items():
        targets = group.get("targets") or []
        for t in targets:
            r = 3 if t == name else 2 if t.startswith("re:") and _matches(name, t) else 1 if t == "Linear" else 0
            if r > rank:
                best, rank = group, r
    if best is None:
        raise ValueError(
            f"{where}: no config_group targets layer {name!r} (targets seen: "
            f"{[g.get('targets') for g in groups.values()]})"
        )
    return best


def _import_layer(name, scheme, fmt, tensors, lw, where):
    p = prefix(name)
    w = scheme.get("weights") or {}
    bits, wtype, sym = w.get("num_bits"), w.get("type", "int"), w.get("symmetric", True)
    strategy = w.get("strategy")
    if fmt not in _FORMATS:
        raise ValueError(f"{where}: layer {name!r} uses format {fmt!r}; mmkernels reads {list(_FORMATS)}")
    if strategy not in ("channel", "group", "tensor"):
        raise ValueError(
            f"{where}: layer {name!r} uses weight strategy {strategy!r}; mmkernels "
            f"reads 'channel', 'group' and 'tensor'"
        )
    if (wtype, bits) not in (("int", 4), ("int", 8), ("float", 8)):
        raise ValueError(
            f"{where}: layer {name!r} has weights type={wtype!r}, num_bits={bits!r}; "
            f"mmkernels reads int4, int8 and float8 (e4m3)"
        )
    act_bits = _act_bits(scheme.get("input_activations"), wtype, where, name)
    keys = {p + "weight_scale"}
    g_idx = None
    if p + "weight_g_idx" in tensors:
        g_idx = _io.expect_tensor(tensors, p + "weight_g_idx", lw, [torch.int32, torch.int64], (None,)).to(torch.int64)
        keys.add(p + "weight_g_idx")
    half = 1 << (bits - 1)
    if fmt == "pack-quantized":
        shape = _io.expect_tensor(tensors, p + "weight_shape", lw, [torch.int64, torch.int32], (2,))
        n, k = (int(v) for v in shape.tolist())
        per = 32 // bits
        packed = _io.expect_tensor(tensors, p + "weight_packed", lw, [torch.int32], (n, -(-k // per)))
        u = _io.unpack_int32(packed, bits, dim=1)[:, :k]
        keys |= {p + "weight_shape", p + "weight_packed"}
    else:
        wdtype = FP8_DTYPE if wtype == "float" else torch.int8
        weight = _io.expect_tensor(tensors, p + "weight", lw, [wdtype], (None, None))
        n, k = weight.shape
        keys.add(p + "weight")
        u = None if wtype == "float" else weight.to(torch.int64) + half
    scales = _scales(tensors[p + "weight_scale"], n, k, strategy, w.get("group_size"), lw, p)
    bias = None
    if p + "bias" in tensors:
        bias = _io.expect_tensor(tensors, p + "bias", lw, _FLOATS, (n,))
        keys.add(p + "bias")
    if g_idx is not None and (
        g_idx.numel() != k or (k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[1]))
    ):
        raise ValueError(
            f"{lw}: weight_g_idx must be ({k},) with values in [0, {scales.shape[1]}), got {list(g_idx.shape)}"
        )
    if wtype == "float":
        gs = w.get("group_size") if strategy == "group" else None
        return _fp8_layer(weight, scales, g_idx, bias, act_bits, lw, gs), keys
    zeros = None
    if not sym:
        key = p + "weight_zero_point"
        keys.add(key)
        if fmt == "pack-quantized":
            zp = _io.expect_tensor(tensors, key, lw, [torch.int32], (-(-n // (32 // bits)), scales.shape[1]))
            zeros = _io.unpack_int32(zp, bits, dim=0)[:n]
        else:
            zp = _io.expect_tensor(tensors, key, lw, [torch.int8], (None, None))
            zeros = _expand(zp.to(torch.int64), n, scales.shape[1], lw, key) + half
    gs = w.get("group_size") if strategy == "group" else None
    return build_layer(u, zeros, scales, g_idx, bits=bits, bias=bias, act_bits=act_bits, where=lw, group_size=gs), keys


def _act_bits(act, wtype, where, name) -> Optional[int]:
    if act is None:
        return None
    want = {"num_bits": 8, "type": wtype, "symmetric": True, "strategy": "token", "dynamic": True}
    seen = {key: act.get(key, want[key] if key == "symmetric" else None) for key in want}
    if seen != want:
        raise ValueError(
            f"{where}: layer {name!r} has input_activations {act}; mmkernels runs "
            f"only dynamic per-token symmetric 8-bit activations ({want})"
        )
    return 8


def _scales(s: Tensor, n: int, k: int, strategy: str, group_size, lw: str, p: str) -> Tensor:
    key = p + "weight_scale"
    if s.dtype not in _FLOATS:
        raise ValueError(f"{lw}: tensor {key!r} is {_io.describe(s)}, expected a float dtype")
    if strategy == "group":
        if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
            raise ValueError(f"{lw}: group_size={group_size!r} must be a positive divisor of K = {k}")
        g = k // group_size
    else:
        g = 1
    return _expand(s.to(torch.float32), n, g, lw, key)


def _expand(t: Tensor, n: int, g: int, lw: str, key: str) -> Tensor:
    """``(N, G)`` from ``(N, G)``, or from a per-tensor ``()`` / ``(1,)`` / ``(1, 1)`` value."""
    if t.numel() == 1 and g == 1:
        return t.reshape(1, 1).expand(n, 1).contiguous()
    if t.dim() == 1 and g == 1 and t.shape[0] == n:
        return t.reshape(n, 1)
    if tuple(t.shape) != (n, g):
        raise ValueError(f"{lw}: tensor {key!r} has shape {list(t.shape)}, expected [{n}, {g}]")
    return t.contiguous()


def _fp8_layer(weight, scales, g_idx, bias, act_bits, lw, group_size) -> QuantLinear:
    n, k = weight.shape
    g = scales.shape[1]
    if group_size is None or g * group_size != k:
        group_size = None if g == 1 else k // g
    perm = None if g_idx is None else perm_from_g_idx(g_idx, group_size, lw)
    if perm is not None:
        weight = weight[:, perm]
    try:
        qw = QuantizedWeight(weight.contiguous(), scales, None, bits=8, group_size=group_size, shape=(n, k))
        return QuantLinear.from_quantized(qw, bias, act_bits=act_bits, input_perm=perm)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{lw}: cannot build a QuantLinear: {e}") from None
