"""The settings of one :func:`mmkernels.patch` call, checked once (JSON-friendly dicts in, a
frozen, comparable record out)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .._dispatch import BACKEND_NAMES

# method -> {key: (type check description, default)}; "method" itself is implied.
REDUCE_KEYS: Dict[str, Dict[str, Any]] = {
    "tome": {"r": None, "protect_first": 1},
    "evit": {"keep": None, "layers": (3, 6, 9), "protect_first": 1},
    "visionzip": {"dominant": None, "contextual": None, "layer": -2},
    "prumerge": {"layer": -2, "plus": False},
    "fastv": {"layer": 2, "keep": 0.25},
}
BACKENDS = (None, *BACKEND_NAMES)


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class PatchSettings:
    attention: bool
    reduce: Optional[Tuple] = None  # frozen items of the reduce dict
    quantize: Optional[Tuple] = None  # frozen items of the quantize dict
    backend: Optional[str] = None
    linear: bool = False
    fuse_activations: bool = True

    @property
    def reduce_dict(self) -> Optional[dict]:
        return None if self.reduce is None else dict(self.reduce)

    def __str__(self) -> str:
        parts = [f"attention={self.attention}"]
        if self.reduce is not None:
            parts.append(f"reduce={dict(self.reduce)}")
        if self.quantize is not None:
            parts.append(f"quantize={dict(self.quantize)}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        if self.linear:
            parts.append("linear=True")
        if not self.fuse_activations:
            parts.append("fuse_activations=False")
        return ", ".join(parts)


def _check_reduce(reduce) -> Dict[str, Any]:
    if hasattr(reduce, "__dataclass_fields__"):  # typed spec objects are accepted too
        reduce = {
            "method": getattr(reduce, "method"),
            **{k: getattr(reduce, k) for k in reduce.__dataclass_fields__ if k != "method"},
        }
    if not isinstance(reduce, dict):
        raise TypeError(f"reduce must be a dict such as {{'method': 'tome', 'r': 8}}, got {type(reduce).__name__}")
    method = reduce.get("method")
    if method not in REDUCE_KEYS:
        raise ValueError(f"reduce['method'] must be one of {sorted(REDUCE_KEYS)}, got {method!r}")
    allowed = REDUCE_KEYS[method]
    unknown = sorted(set(reduce) - set(allowed) - {"method"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in reduce for method {method!r}; allowed: {sorted(allowed)}")
    spec = {"method": method}
    for key, default in allowed.items():
        if key not in reduce and default is None:
            raise ValueError(f"reduce method {method!r} needs {key!r}")
        spec[key] = reduce.get(key, default)
    return spec


def _check_quantize(quantize) -> Dict[str, Any]:
    from ..compress import quantize_model

    if not isinstance(quantize, dict):
        raise TypeError(
            f"quantize must be a dict of quantize_model keyword arguments such as "
            f"{{'bits': 8, 'act_bits': 8}}, got {type(quantize).__name__}"
        )
    params = set(inspect.signature(quantize_model).parameters) - {"model", "calib_data"}
    unknown = sorted(set(quantize) - params)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in quantize; quantize_model accepts {sorted(params)}")
    return dict(quantize)


def parse_settings(attention, reduce, quantize, backend, linear=False, fuse_activations=True) -> PatchSettings:
    if not isinstance(attention, bool):
        raise TypeError(f"attention must be a bool, got {attention!r}")
    if not isinstance(linear, bool):
        raise TypeError(f"linear must be a bool, got {linear!r}")
    if not isinstance(fuse_activations, bool):
        raise TypeError(f"fuse_activations must be a bool, got {fuse_activations!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reduce_spec = None if reduce is None else _check_reduce(reduce)
    quant_spec = None if quantize is None else _check_quantize(quantize)
    if reduce_spec is not None and not attention:
        raise ValueError(
            "reduce needs attention=True: the reduction methods read per-key scores from mmkernels' fused attention"
        )
    return PatchSettings(attention, _freeze(reduce_spec), _freeze(quant_spec), backend, linear, fuse_activations)
