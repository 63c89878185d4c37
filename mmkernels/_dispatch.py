"""Backend registry and selection, shared by every op family.

A backend declares what it serves as data (:class:`Backend`: devices, dtypes, head dims, the op's
features it takes) plus, where the data cannot say it, a small ``check(call)`` hook; every reason it
cannot serve one concrete call derives from that (all of them are returned, never only the first),
and ``mmkernels info`` prints its table from the same declarations (:func:`capability_table`).

Each op (``"attention"``, ``"tome_plan"``, ``"qmatmul"`` ...) has an ordered list of backends.
Selection order:

1. ``backend=`` passed to the op,
2. the environment variable ``MMKERNELS_BACKEND`` (all ops) or ``MMKERNELS_<OP>_BACKEND``,
3. the first backend in the op's priority order that may be auto-selected on the call's device
   (``auto_devices``), can serve the call, and whose ``auto_rule`` (if any) takes it on this
   machine (e.g. "torch's SDPA where it was calibrated faster than our kernel on this machine",
   mmkernels._calibration, "else only on AMX CPUs").

When nothing can serve a call, :class:`NoBackendError` lists every backend with its reasons, in the
spirit of xformers' "No operator found for ... because ..." message.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda", "torch")

# Short dtype names for the capability table.
DTYPE_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}


class NoBackendError(ValueError):
    """No registered backend can run this call; the message says why, backend by backend."""


@dataclass(frozen=True)
class HeadDims:
    """Head dims a backend takes: multiples of ``multiple`` in [low, high], for ``call.head_dim``
    and ``call.head_dim_v`` (attention calls)."""

    low: int
    high: int
    multiple: int = 1

    def reasons(self, call: Any) -> List[str]:
        out = []
        for label, attr in (("head dim D", "head_dim"), ("value head dim Dv", "head_dim_v")):
            d = getattr(call, attr, None)
            if d is not None and (d % self.multiple or not self.low <= d <= self.high):
                out.append(f"{label}={d} is not a multiple of {self.multiple} in [{self.low}, {self.high}]")
        return out

    def __str__(self) -> str:
        return f"{self.low}-{self.high}" + (f" /{self.multiple}" if self.multiple > 1 else "")


@dataclass(frozen=True)
class OpSpec:
    """What the dispatcher knows about an op beyond its backends: the optional features a call may
    use (name -> predicate on the call), in display order, and how its dtype is named in reasons."""

    features: Mapping[str, Callable[[Any], bool]]
    dtype_label: str = "dtype"


_OPS: Dict[str, OpSpec] = {}
_NO_FEATURES = OpSpec({})


def define_op(
    op: str, features: Optional[Mapping[str, Callable[[Any], bool]]] = None, dtype_label: str = "dtype"
) -> None:
    """Declare ``op``'s optional features (e.g. attention's varlen, key_bias, scores ...)."""
    _OPS[op] = OpSpec(dict(features or {}), dtype_label)
    _SELECTED.clear()


def _always_available() -> Tuple[bool, str]:
    return True, ""


class Backend:
    """One implementation of one op, declared as data.

    * ``run``: the callable, or ``"package.module:function"`` imported on the first call (then
      bound directly: no per-call lookup).
    * ``devices``: device types it can run (None: any); ``auto_devices``: those on which
      auto-selection may pick it (default: ``devices``; explicit selection ignores it).
    * ``dtypes``: the call's dtype names it takes (None: any); ``dtype_notes``: dtypes it refuses
      with a better reason than "not supported" (e.g. float64 -> "served by the reference").
    * ``head_dims``: :class:`HeadDims` or None.
    * ``features``: the op's features it serves (None: all of them); ``feature_notes`` as above.
    * ``check(call)``: the per-backend hook, extra reasons the data cannot express.
    * ``availability()``: ``(ok, reason)`` for the backend as a whole (built, importable).
    * ``auto_rule(call)``: ``(take, why)`` for auto-selection of a call it can serve (None: take).
    * ``devices_note`` / ``notes``: free text for ``mmkernels info --verbose`` (never a rule).
    """

    def __init__(
        self,
        name: str,
        run: Any,
        *,
        devices: Optional[Sequence[str]] = ("cpu", "cuda"),
        auto_devices: Optional[Sequence[str]] = None,
        dtypes: Optional[Sequence[str]] = None,
        dtype_notes: Optional[Mapping[str, str]] = None,
        head_dims: Optional[HeadDims] = None,
        features: Optional[Iterable[str]] = None,
        feature_notes: Optional[Mapping[str, str]] = None,
        check: Optional[Callable[[Any], Iterable[str]]] = None,
        availability: Optional[Callable[[], Tuple[bool, str]]] = None,
        auto_rule: Optional[Callable[[Any], Tuple[bool, str]]] = None,
        devices_note: str = "",
        notes: str = "",
    ):
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
        self.name = name
        self._run_spec = run
        if isinstance(run, str):
            self.run = self._resolve_and_run
        else:
            self.run = run
        self.devices = None if devices is None else tuple(devices)
        self.auto_devices = (
            tuple(auto_devices)
            if auto_devices is not None
            else (self.devices if self.devices is not None else ("cpu", "cuda"))
        )
        self.dtypes = None if dtypes is None else tuple(dtypes)
        self.dtype_notes = dict(dtype_notes or {})
        self.head_dims = head_dims
        self.features = None if features is None else frozenset(features)
        self.feature_notes = dict(feature_notes or {})
        self.check = check
        self.availability = availability or _always_available
        self.auto_rule = auto_rule
        self.devices_note = devices_note
        self.notes = notes
        self.op: Optional[str] = None  # set by register()

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, op={self.op!r})"

    def _resolve_and_run(self, *args, **kwargs):
        module, _, attr = self._run_spec.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        self.run = fn  # later calls go straight to the kernel's entry
        return fn(*args, **kwargs)

    @property
    def spec(self) -> OpSpec:
        return _OPS.get(self.op or "", _NO_FEATURES)

    def unsupported(self, call: Any) -> List[str]:
        """Every reason this backend cannot serve ``call`` (availability aside); empty: it can."""
        reasons = []
        device = getattr(call, "device_type", None)
        if self.devices is not None and device is not None and device not in self.devices:
            where = " or ".join(d.upper() if d in ("cpu", "cuda") else d for d in self.devices)
            reasons.append(f"runs {where} tensors only, got {device}")
        dtype = getattr(call, "dtype_name", None)
        if dtype is not None and (self.dtypes is not None and dtype not in self.dtypes or dtype in self.dtype_notes):
            reasons.append(
                self.dtype_notes.get(dtype)
                or (f"{self.spec.dtype_label} {dtype} not supported ({', '.join(self.dtypes)})")
            )
        if self.head_dims is not None:
            reasons += self.head_dims.reasons(call)
        if self.features is not None:
            for feature, used in self.spec.features.items():
                if feature not in self.features and used(call):
                    reasons.append(self.feature_notes.get(feature, f"{feature} is not supported"))
        if self.check is not None:
            try:
                reasons += list(self.check(call))
            except ImportError:  # the module behind the hook is missing: availability says so
                pass
        return reasons

    def reasons(self, call: Any) -> List[str]:
        """Every reason this backend cannot run ``call`` here, availability first; empty: it can."""
        ok, why = self.availability()
        return ([] if ok else [why]) + self.unsupported(call)

    def auto_verdict(self, call: Any) -> Tuple[bool, str]:
        """Whether auto-selection takes this backend for a call it can serve, and why."""
        if self.auto_rule is None:
            return True, ""
        return self.auto_rule(call)

    # --- the capability table, from the same declarations -------------------------------------
    def capabilities(self) -> Dict[str, str]:
        if self.devices is None:
            devices = "any"
        else:
            devices = ",".join(d if d in self.auto_devices else d + "*" for d in self.devices)
        if self.dtypes is None:
            refused = ",".join(DTYPE_SHORT.get(d, d) for d in self.dtype_notes)
            dtypes = f"any but {refused}" if refused else "any"
        else:
            dtypes = ",".join(DTYPE_SHORT.get(d, d) for d in self.dtypes if d not in self.dtype_notes)
        all_features = list(self.spec.features)
        if not all_features:
            features = "-"
        elif self.features is None or set(all_features) <= self.features:
            features = "all"
        else:
            have = [f for f in all_features if f in self.features]
            lack = [f for f in all_features if f not in self.features]
            features = (
                ("all but " + ",".join(lack))
                if len(lack) <= len(have)
                else (("only " + ",".join(have)) if have else "none")
            )
        notes = [self.notes] if self.notes else []
        if self.devices_note:
            notes.append(self.devices_note)
        notes += [f"{DTYPE_SHORT.get(d, d)}: {why}" for d, why in self.dtype_notes.items()]
        if self.auto_rule is not None:
            notes.append(
                "auto-selection: " + (getattr(self.auto_rule, "__doc__", "") or "rule").strip().splitlines()[0]
            )
        return {
            "devices": devices,
            "dtypes": dtypes or "-",
            "head dims": str(self.head_dims) if self.head_dims else "-",
            "features": features,
            "notes": "; ".join(notes),
        }


_REGISTRY: Dict[str, List[Backend]] = {}
_WARNED: set = set()
_SELECTED: Dict[tuple, Backend] = {}


def register(op: str, backend: Backend) -> None:
    """Append ``backend`` to ``op``'s priority order (replacing one of the same name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register() takes a _dispatch.Backend, got {type(backend).__name__}")
    backend.op = op
    backends = _REGISTRY.setdefault(op, [])
    backends[:] = [b for b in backends if b.name != backend.name] + [backend]
    _SELECTED.clear()


def backends_for(op: str) -> List[Backend]:
    return list(_REGISTRY.get(op, []))


def clear_selection_cache() -> None:
    """Forget cached choices (after changing a rule's input, e.g. the CPU class in a test)."""
    _SELECTED.clear()


def _requested(op: str, backend: Optional[str]) -> tuple:
    if backend:
        return backend, "backend="
    for var in (f"MMKERNELS_{op.upper()}_BACKEND", "MMKERNELS_BACKEND"):
        value = os.environ.get(var, "").strip()
        if value and value != "auto":
            return value, var
    return None, None


def _verdict(b: Backend, call: Any, device_type: Optional[str]) -> str:
    reasons = b.reasons(call)
    if reasons:
        return "; ".join(reasons)
    if device_type is not None and device_type not in b.auto_devices:
        return f"can run it, but is chosen on {device_type} only when asked for"
    if device_type is not None:
        take, why = b.auto_verdict(call)
        if not take:
            return f"can run it, but auto-selection passes it over here: {why}"
    return "ok"


def _format_reasons(header: str, call: Any, backends: Sequence[Backend], device_type: Optional[str] = None) -> str:
    lines = [f"{header} {call}:"]
    for b in backends:
        lines.append(f"  - {b.name}: " + _verdict(b, call, device_type))
    return "\n".join(lines)


# The override variables are read on every call (a user may set them at any time), through
# os.environ's underlying dict when it has the POSIX layout (bytes keys): os.environ.get encodes
# the key and decodes the value each time, ~3 us per variable, a visible share of a GEMV call.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_FAST = (
    isinstance(_ENV_DATA, dict) and os.name == "posix" and all(isinstance(k, bytes) for k in list(_ENV_DATA)[:1])
)


_ENV_KEYS: Dict[str, bytes] = {}


def _env_raw(name: str):
    """The raw value of environment variable ``name`` now (bytes on POSIX; None if unset)."""
    if not _ENV_FAST:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    return _ENV_DATA.get(key)


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is ``"1"``, read now (cheaply: ~0.1 us)."""
    return _env_raw(name) in (b"1", "1")


def _env_overrides(op: str) -> tuple:
    """The raw values of ``MMKERNELS_<OP>_BACKEND`` and ``MMKERNELS_BACKEND`` (None if unset)."""
    return (_env_raw(f"MMKERNELS_{op.upper()}_BACKEND"), _env_raw("MMKERNELS_BACKEND"))


class CallMemo:
    """Call descriptions memoised by the tensor metadata they are built from (a description is a
    pure function of its key, so it never needs invalidating). Building one costs ~3 us, a tenth
    of a small call; a lookup ~0.5 us. Bounded: cleared when ``limit`` keys are held."""

    def __init__(self, limit: int = 4096):
        self._calls: Dict[tuple, Any] = {}
        self._limit = limit

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        call = self._calls.get(key)
        if call is None:
            call = build()
            if len(self._calls) >= self._limit:
                self._calls.clear()
            self._calls[key] = call
        return call


def select(op: str, call: Any, device_type: str, backend: Optional[str] = None) -> Backend:
    """Pick the backend that runs ``call`` (see the module docstring for the order).

    Successful choices are cached per (op, call, device, request, environment overrides): the call
    descriptions hold metadata only (with a size bucket where calibration needs one), and
    availability, the machine's CPU class and a calibrated decision per bucket do not change within
    a process (:func:`clear_selection_cache` when a test changes them; ``_calibration.clear()``
    clears both).
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


def auto_choice(op: str, call: Any, device_type: str) -> Tuple[Optional[Backend], List[Tuple[str, str]]]:
    """What auto-selection picks for ``call`` and each backend's verdict on the way, in priority
    order (for ``mmkernels info`` and error messages): ``(chosen or None, [(name, verdict)])``."""
    chosen, trail = None, []
    for b in backends_for(op):
        verdict = _verdict(b, call, device_type)
        trail.append((b.name, verdict))
        if chosen is None and verdict == "ok":
            chosen = b
    return chosen, trail


def _select_uncached(op: str, call: Any, device_type: str, backend: Optional[str]) -> Backend:
    backends = backends_for(op)
    if not backends:
        raise RuntimeError(f"no backend registered for op {op!r}")
    name, source = _requested(op, backend)
    if name is not None:
        by_name = {b.name: b for b in backends}
        if name not in by_name:
            raise ValueError(
                f"{source}: unknown backend {name!r} for {op}; expected one of {sorted(by_name)} or 'auto'"
            )
        chosen = by_name[name]
        reasons = chosen.reasons(call)
        if reasons:
            raise NoBackendError(
                f"{source} asked for backend {name!r}, which cannot run {call}: "
                + "; ".join(reasons)
                + "\n"
                + _format_reasons("Backends for", call, backends)
            )
        return chosen
    for b in backends:
        if device_type in b.auto_devices and not b.reasons(call) and b.auto_verdict(call)[0]:
            # Warn when a faster backend exists but cannot serve this call (float64 is the
            # reference's own job: tests use it as the oracle).
            faster = [o for o in backends if o.name != "reference" and device_type in o.auto_devices]
            if b.name == "reference" and faster and getattr(call, "dtype_name", "") != "float64":
                key = (op, str(call))
                if key not in _WARNED:
                    _WARNED.add(key)
                    warnings.warn(
                        _format_reasons("mmkernels falls back to the slow reference for", call, backends, device_type),
                        stacklevel=4,
                    )
            return b
    raise NoBackendError(_format_reasons("No mmkernels backend can run", call, backends, device_type))


def capability_table() -> List[Dict[str, str]]:
    """One row per (op, backend) in priority order: availability and the capabilities derived from
    each backend's declarations, for ``mmkernels info``."""
    rows = []
    for op, backends in sorted(_REGISTRY.items()):
        for b in backends:
            ok, why = b.availability()
            row = {"op": op, "backend": b.name, "available": "yes" if ok else f"no ({why})"}
            row.update(b.capabilities())
            rows.append(row)
    return rows
