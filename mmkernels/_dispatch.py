"""Backend registry and selection, shared by every op family.

Each op (``"attention"``, later ``"tome_plan"``, ``"qmatmul"`` ...) has an ordered list of backends. A
backend declares what it can serve and, for one concrete call, *why not* (a list of reasons; empty
means it can run the call). Selection order:

1. ``backend=`` passed to the op,
2. the environment variable ``MMKERNELS_BACKEND`` (all ops) or ``MMKERNELS_<OP>_BACKEND``,
3. the first capable backend in the op's priority order for the call's device.

When nothing can serve a call, :class:`NoBackendError` lists every backend with its reasons, in the
spirit of xformers' "No operator found for ... because ..." message.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")


class NoBackendError(ValueError):
    """No registered backend can run this call; the message says why, backend by backend."""


@dataclass
class Backend:
    """One implementation of one op.

    ``unsupported(call)`` returns the reasons this backend cannot serve ``call`` (empty list: it can).
    ``availability()`` returns ``(ok, reason)`` for the backend as a whole (extension built, Triton
    importable, ...). ``capabilities`` is a human-readable summary shown by ``mmkernels info``.
    """

    name: str
    run: Callable[..., Any]
    unsupported: Callable[[Any], List[str]]
    availability: Callable[[], tuple] = lambda: (True, "")
    capabilities: Dict[str, str] = field(default_factory=dict)
    # Devices on which auto-selection may pick this backend (explicit selection ignores it).
    auto_devices: Sequence[str] = ("cpu", "cuda")

    def reasons(self, call: Any) -> List[str]:
        ok, why = self.availability()
        try:
            unsupported = list(self.unsupported(call))
        except ImportError:
            unsupported = []
        return ([] if ok else [why]) + unsupported


_REGISTRY: Dict[str, List[Backend]] = {}
_WARNED: set = set()


def register(op: str, backend: Backend) -> None:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend.name!r}")
    backends = _REGISTRY.setdefault(op, [])
    backends[:] = [b for b in backends if b.name != backend.name] + [backend]
    _SELECTED.clear()


def backends_for(op: str) -> List[Backend]:
    return list(_REGISTRY.get(op, []))


def _requested(op: str, backend: Optional[str]) -> tuple:
    if backend:
        return backend, "backend="
    for var in (f"MMKERNELS_{op.upper()}_BACKEND", "MMKERNELS_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value and value != "auto":
            return value, var
    return None, None


def _format_reasons(header: str, call: Any, backends: Sequence[Backend]) -> str:
    lines = [f"{header} {call}:"]
    for b in backends:
        reasons = b.reasons(call)
        lines.append(f"  - {b.name}: " + ("; ".join(reasons) if reasons else "ok"))
    return "\n".join(lines)


_SELECTED: Dict[tuple, Backend] = {}

# The override variables are read on every call (a user may set them at any time), through
# os.environ's underlying dict when it has the POSIX layout (bytes keys): os.environ.get encodes
# the key and decodes the value each time, ~3 us per variable, a visible share of a GEMV call.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_FAST = isinstance(_ENV_DATA, dict) and os.name == "posix" and all(
    isinstance(k, bytes) for k in list(_ENV_DATA)[:1])


def _env_overrides(op: str) -> tuple:
    """The raw values of ``MMKERNELS_<OP>_BACKEND`` and ``MMKERNELS_BACKEND`` (None if unset)."""
    if _ENV_FAST:
        return (_ENV_DATA.get(b"MMKERNELS_" + op.upper().encode() + b"_BACKEND"),
                _ENV_DATA.get(b"MMKERNELS_BACKEND"))
    return (os.environ.get(f"MMKERNELS_{op.upper()}_BACKEND"), os.environ.get("MMKERNELS_BACKEND"))


def select(op: str, call: Any, device_type: str, backend: Optional[str] = None) -> Backend:
    """Pick the backend that runs ``call`` (see the module docstring for the order).

    Successful choices are cached per (op, call, device, request, environment overrides): the call
    descriptions hold metadata only, and availability does not change within a process.
    """
    key = (op, call, device_type, backend, _env_overrides(op))
    try:
        return _SELECTED[key]
    except (KeyError, TypeError):  # TypeError: an unhashable call description is never cached
        pass
    chosen = _select_uncached(op, call, device_type, backend)
    try:
        _SELECTED[key] = chosen
    except TypeError:
        pass
    return chosen


def _select_uncached(op: str, call: Any, device_type: str, backend: Optional[str]) -> Backend:
    backends = backends_for(op)
    if not backends:
        raise RuntimeError(f"no backend registered for op {op!r}")
    name, source = _requested(op, backend)
    if name is not None:
        by_name = {b.name: b for b in backends}
        if name not in by_name:
            raise ValueError(f"{source}: unknown backend {name!r} for {op}; "
                             f"expected one of {sorted(by_name)} or 'auto'")
        chosen = by_name[name]
        reasons = chosen.reasons(call)
        if reasons:
            raise NoBackendError(f"{source} asked for backend {name!r}, which cannot run {call}: "
                                 + "; ".join(reasons) + "\n"
                                 + _format_reasons("Backends for", call, backends))
        return chosen
    for b in backends:
        if device_type in b.auto_devices and not b.reasons(call):
            # Warn when a faster backend exists but cannot serve this call (float64 is the
            # reference's own job: tests use it as the oracle).
            faster = [o for o in backends if o.name != "reference" and device_type in o.auto_devices]
            if (b.name == "reference" and faster
                    and getattr(call, "dtype_name", "") != "float64"):
                key = (op, str(call))
                if key not in _WARNED:
                    _WARNED.add(key)
                    warnings.warn(_format_reasons("mmkernels falls back to the slow reference for",
                                                  call, backends), stacklevel=4)
            return b
    raise NoBackendError(_format_reasons("No mmkernels backend can run", call, backends))


def capability_table() -> List[Dict[str, str]]:
    """One row per (op, backend): availability and declared capabilities, for ``mmkernels info``."""
    rows = []
    for op, backends in sorted(_REGISTRY.items()):
        for b in backends:
            ok, why = b.availability()
            row = {"op": op, "backend": b.name, "available": "yes" if ok else f"no ({why})"}
            row.update(b.capabilities)
            rows.append(row)
    return rows
