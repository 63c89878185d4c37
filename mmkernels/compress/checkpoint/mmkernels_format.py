"""The ``"mmkernels"`` checkpoint format: lossless, self-checking.

A directory holding two files::

    model.safetensors    every tensor of ``model.state_dict()``, under its state-dict name and in
                         its own dtype: the QuantLinear buffers (``<layer>.quantized.qweight``,
                         ``.scales``, ``.zeros`` (asymmetric), ``.meta``, ``<layer>.bias``,
                         ``.smooth``, ``.input_perm``; layouts in ``quant/packing.py`` and
                         ``nn/quant_linear.py``) and every float parameter / buffer
    mmkernels.json       {"format": "mmkernels-quantized", "format_version": 1,
                          "library_version": "...", "weights_file": "model.safetensors",
                          "layers":  {name: {"in_features", "out_features", "bits",
                                             "group_size" (null = per channel), "symmetric",
                                             "fp8", "act_bits" (null | 8), "bias", "smooth",
                                             "input_perm"}},
                          "tensors": {key: {"dtype", "shape", "sha256"}},
                          "split_layers": {name: {"in_features", "out_features",
                                                  "outlier_channels"}}}   (format_version 2)

``split_layers`` (present from ``format_version`` 2, written only when the model has one) names
each :class:`~mmkernels.nn.OutlierSplitLinear`: its two parts are recorded under ``layers`` as
``<name>.main`` and ``<name>.outliers``, its channel indices are the int64 tensors
``<name>.main_index`` / ``<name>.outlier_index``; :func:`load` rebuilds the module and checks that
the two index sets partition ``range(in_features)``. A file without split layers is written as
``format_version`` 1, readable by every earlier mmkernels.

``sha256`` is taken over each tensor's bytes in row-major order (exactly the bytes safetensors
stores). :func:`load` refuses, with a ValueError naming the file and tensor: a missing or truncated
file, a format name it does not know, a ``format_version`` newer than :data:`FORMAT_VERSION`,
tensors missing from or unexpected in the file, a dtype / shape / sha256 that differs from the
metadata, and layer metadata that disagrees with the tensors (wrong dtype or shape for the recorded
bits / group size, ``meta`` buffer disagreeing, a bias / smooth / input_perm present but not
recorded or the reverse).
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from ..._version import __version__
from ...nn.quant_linear import QuantLinear
from ...nn.split_linear import OutlierSplitLinear
from ...quant.packing import FP8_DTYPE, QuantizedWeight
from . import _io
from .common import layer_config, prefix, quant_layers, split_layers

FORMAT_NAME = "mmkernels-quantized"
FORMAT_VERSION = 2  # the newest this module reads and writes (2: split_layers)
META_FILE = "mmkernels.json"
WEIGHTS_FILE = "model.safetensors"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LAYER_KEYS = (
    "in_features",
    "out_features",
    "bits",
    "group_size",
    "symmetric",
    "fp8",
    "act_bits",
    "bias",
    "smooth",
    "input_perm",
)
_SPLIT_KEYS = ("in_features", "out_features", "outlier_channels")


def save(model: nn.Module, directory: str) -> None:
    tensors = {k: v for k, v in model.state_dict().items()}
    layers = {name: layer_config(m) for name, m in quant_layers(model).items()}
    splits = {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "outlier_channels": m.outlier_index.numel(),
        }
        for name, m in split_layers(model).items()
    }
    meta = {
        "format": FORMAT_NAME,
        "format_version": 2 if splits else 1,
        "library_version": _library_version(),
        "weights_file": WEIGHTS_FILE,
        "layers": layers,
        "tensors": {
            k: {"dtype": _io.dtype_name(v.dtype), "shape": list(v.shape), "sha256": _io.tensor_sha256(v)}
            for k, v in tensors.items()
        },
    }
    if splits:
        meta["split_layers"] = splits
    _io.save_tensors(tensors, os.path.join(directory, WEIGHTS_FILE))
    _io.write_json(os.path.join(directory, META_FILE), meta)


def load(directory: str) -> Tuple[Dict[str, nn.Module], Dict[str, Tensor], dict]:
    """``(layers, other_tensors, metadata)``: a QuantLinear per recorded layer (an
    OutlierSplitLinear per recorded split layer, in place of its two parts), the remaining tensors
    by state-dict name, and the parsed metadata."""
    meta_path = os.path.join(directory, META_FILE)
    meta = _io.read_json(meta_path)
    _check_header(meta, meta_path)
    weights = os.path.join(directory, WEIGHTS_FILE)
    tensors = _io.load_tensors(weights)
    _check_tensors(meta["tensors"], tensors, meta_path, weights)
    layers: Dict[str, QuantLinear] = {}
    claimed = set()
    for name, cfg in meta["layers"].items():
        layers[name], keys = _build(name, cfg, tensors, f"{weights} (layer {name!r})")
        claimed |= keys
    stray = sorted(k for k in tensors if k not in claimed and any(k.startswith(prefix(n)) for n in layers))
    if stray:
        raise ValueError(
            f"{weights}: tensors {stray[:8]} lie under a quantized layer but are not part of its recorded configuration"
        )
    modules: Dict[str, nn.Module] = dict(layers)
    for name, cfg in meta.get("split_layers", {}).items():
        modules[name], keys = _build_split(name, cfg, modules, tensors, f"{weights} (split layer {name!r})")
        claimed |= keys
    return modules, {k: v for k, v in tensors.items() if k not in claimed}, meta


def _check_header(meta: dict, where: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where}: 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {version} was written by a newer mmkernels; "
            f"this version ({_library_version()}) reads format_version <= "
            f"{FORMAT_VERSION}. Upgrade mmkernels to load it"
        )
    if meta.get("weights_file", WEIGHTS_FILE) != WEIGHTS_FILE:
        raise ValueError(f"{where}: 'weights_file' is {meta.get('weights_file')!r}, expected {WEIGHTS_FILE!r}")
    for key in ("layers", "tensors"):
        if not isinstance(meta.get(key), dict):
            raise ValueError(f"{where}: {key!r} must be a JSON object, got {type(meta.get(key)).__name__}")
    for name, cfg in meta["layers"].items():
        if not isinstance(cfg, dict) or set(cfg) != set(_LAYER_KEYS):
            raise ValueError(f"{where}: layer {name!r} must record exactly {list(_LAYER_KEYS)}, got {cfg!r}")
    splits = meta.get("split_layers", {})
    if splits and version < 2:
        raise ValueError(f"{where}: 'split_layers' needs format_version >= 2, got {version}")
    if not isinstance(splits, dict):
        raise ValueError(f"{where}: 'split_layers' must be a JSON object, got {type(splits).__name__}")
    for name, cfg in splits.items():
        if (
            not isinstance(cfg, dict)
            or set(cfg) != set(_SPLIT_KEYS)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in cfg.values())
        ):
            raise ValueError(
                f"{where}: split layer {name!r} must record exactly "
                f"{list(_SPLIT_KEYS)} as positive integers, got {cfg!r}"
            )


def _check_tensors(recorded: dict, tensors: Dict[str, Tensor], meta_path: str, weights: str) -> None:
    missing = sorted(set(recorded) - set(tensors))
    if missing:
        raise ValueError(
            f"{weights}: tensors recorded in {os.path.basename(meta_path)} are missing from the file: {missing[:8]}"
        )
    unexpected = sorted(set(tensors) - set(recorded))
    if unexpected:
        raise ValueError(f"{weights}: tensors not recorded in {os.path.basename(meta_path)}: {unexpected[:8]}")
    for key, info in recorded.items():
        t = tensors[key]
        if not isinstance(info, dict) or not {"dtype", "shape", "sha256"} <= set(info):
            raise ValueError(f"{meta_path}: entry for tensor {key!r} must hold dtype, shape and sha256, got {info!r}")
        dtype = _io.dtype_from_name(info["dtype"], f"{meta_path} (tensor {key!r})")
        if t.dtype != dtype or list(t.shape) != list(info["shape"]):
            raise ValueError(
                f"{weights}: tensor {key!r} is {_io.describe(t)}, but "
                f"{os.path.basename(meta_path)} records "
                f"{info['dtype']}{list(info['shape'])}"
            )
        digest = _io.tensor_sha256(t)
        if digest != info["sha256"]:
            raise ValueError(
                f"{weights}: tensor {key!r} fails its sha256 check (the file holds "
                f"{digest[:16]}..., {os.path.basename(meta_path)} records "
                f"{str(info['sha256'])[:16]}...): the file was modified or damaged"
            )


def _build(name: str, cfg: dict, tensors: Dict[str, Tensor], where: str):
    p = prefix(name)
    n, k, bits, gs = cfg["out_features"], cfg["in_features"], cfg["bits"], cfg["group_size"]
    sym, fp8 = cfg["symmetric"], cfg["fp8"]
    ints = (n, k, bits) + (() if gs is None else (gs,))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints):
        raise ValueError(
            f"{where}: in_features / out_features / bits / group_size must be "
            f"positive integers (group_size may be null), got {k!r} / {n!r} / "
            f"{bits!r} / {gs!r}"
        )
    flags = [cfg[f] for f in ("symmetric", "fp8", "bias", "smooth", "input_perm")]
    if not all(isinstance(v, bool) for v in flags):
        raise ValueError(f"{where}: symmetric / fp8 / bias / smooth / input_perm must be true or false, got {flags}")
    g = 1 if not gs else k // gs
    qdtype = FP8_DTYPE if fp8 else (torch.int8 if bits == 8 and sym else torch.uint8)
    qk = k if bits == 8 else k // 2
    keys = {p + "quantized.qweight", p + "quantized.scales", p + "quantized.meta"}
    qweight = _io.expect_tensor(tensors, p + "quantized.qweight", where, [qdtype], (n, qk))
    scales = _io.expect_tensor(tensors, p + "quantized.scales", where, [torch.float32], (n, g))
    meta = _io.expect_tensor(tensors, p + "quantized.meta", where, [torch.int64], (6,))
    want_meta = [bits, gs or 0, n, k, int(bool(sym)), int(bool(fp8))]
    if meta.tolist() != want_meta:
        raise ValueError(
            f"{where}: tensor {p}quantized.meta holds {meta.tolist()}, but the "
            f"recorded configuration gives {want_meta} "
            f"([bits, group_size, N, K, symmetric, fp8])"
        )
    zeros = None
    if not sym:
        zeros = _io.expect_tensor(tensors, p + "quantized.zeros", where, [torch.uint8], (n, g))
        keys.add(p + "quantized.zeros")
    optional = {}
    for attr, length, dtypes in (
        ("bias", n, _FLOATS),
        ("smooth", k, [torch.float32]),
        ("input_perm", k, [torch.int64]),
    ):
        key = p + attr
        if cfg[attr]:
            optional[attr] = _io.expect_tensor(tensors, key, where, dtypes, (length,))
            keys.add(key)
        elif key in tensors:
            raise ValueError(f"{where}: tensor {key!r} is present but the layer records {attr}=false")
    try:
        qw = QuantizedWeight(qweight, scales, zeros, bits=bits, group_size=gs, shape=(n, k))
        layer = QuantLinear.from_quantized(
            qw,
            optional.get("bias"),
            act_bits=cfg["act_bits"],
            smooth=optional.get("smooth"),
            input_perm=optional.get("input_perm"),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the recorded configuration does not fit the tensors: {e}") from None
    return layer, keys


def _build_split(name: str, cfg: dict, modules: Dict[str, nn.Module], tensors: Dict[str, Tensor], where: str):
    """An OutlierSplitLinear from its two recorded parts (removed from ``modules``) and its two
    index tensors; returns ``(module, claimed tensor keys)``."""
    p = prefix(name)
    parts = []
    for part in ("main", "outliers"):
        layer = modules.pop(p + part, None)
        if not isinstance(layer, QuantLinear):
            raise ValueError(f"{where}: its part {p + part!r} is not recorded under 'layers'")
        parts.append(layer)
    main, outliers = parts
    k, n, c = cfg["in_features"], cfg["out_features"], cfg["outlier_channels"]
    if (main.in_features + outliers.in_features, outliers.in_features, main.out_features, outliers.out_features) != (
        k,
        c,
        n,
        n,
    ):
        raise ValueError(
            f"{where}: records {k} -> {n} with {c} outlier channels, but its parts "
            f"are {main.in_features} -> {main.out_features} (main) and "
            f"{outliers.in_features} -> {outliers.out_features} (outliers)"
        )
    main_index = _io.expect_tensor(tensors, p + "main_index", where, [torch.int64], (k - c,))
    outlier_index = _io.expect_tensor(tensors, p + "outlier_index", where, [torch.int64], (c,))
    try:
        module = OutlierSplitLinear(main, outliers, outlier_index)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not torch.equal(module.main_index, main_index):
        raise ValueError(f"{where}: tensor {p}main_index is not the complement of {p}outlier_index in range({k})")
    return module, {p + "main_index", p + "outlier_index"}


def _library_version() -> str:
    return __version__
