"""The one loader of mmkernels' compiled extensions, and the CPU-class probe.

``CPU`` is ``mmkernels._C`` (``torch.ops.mmkernels_C``: the C++ CPU kernels of every family) and
``CUDA`` is ``mmkernels._cuda`` (``torch.ops.mmkernels_cuda``, built only with a CUDA torch). Each
is imported at most once per process; a family asks for the op it needs, so a build that lacks
it (an older .so) is reported as such::

    ok, why = _extension.CPU.availability("attention_fwd")   # (False, "ImportError: ...")
    ops = _extension.CPU.require("attention_fwd")             # torch.ops.mmkernels_C, or raises

:func:`cpu_class` says which of this project's two CPU classes the process runs on ("amx": Intel
with AMX tiles, where torch's oneDNN paths are fast; "avx512" / "avx2" / "scalar" otherwise); the
dispatcher's auto-selection rules read it; :func:`cpu_vendor` and :func:`cpu_model` tell whose CPU
it is (mmkernels._calibration: where the class rules were measured, and its cache's fingerprint).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import torch


class Extension:
    """A compiled extension module that registers ``torch.ops.<namespace>`` when imported."""

    def __init__(self, module: str, namespace: str):
        self.module = module
        self.namespace = namespace
        self._tried = False
        self._ops = None
        self._error = ""
        self._has: Dict[str, str] = {}  # op name -> "" (present) or the reason it is missing
        self._kernels: Dict[str, Callable] = {}  # op name -> what kernel() returns

    def _import(self) -> None:
        self._tried = True
        try:
            importlib.import_module(self.module)
            self._ops = getattr(torch.ops, self.namespace)
        except Exception as exc:  # ImportError, OSError (a broken .so), RuntimeError
            self._error = f"{type(exc).__name__}: {exc}"

    def availability(self, required: str) -> Tuple[bool, str]:
        """``(True, "")`` when the extension imports and registers ``required``, else
        ``(False, reason)`` (not built, a broken .so, or a build without that op)."""
        why = self._has.get(required)
        if why is None:
            if not self._tried:
                self._import()
            if self._ops is None:
                why = f"{self.module} is not built or failed to load ({self._error})"
            else:
                try:
                    getattr(self._ops, required)
                    why = ""
                except (AttributeError, RuntimeError) as exc:
                    why = f"this build of {self.module} has no {required} ({type(exc).__name__})"
            self._has[required] = why
        return not why, why

    def ops(self, required: str):
        """``torch.ops.<namespace>`` when ``required`` is there, else None."""
        return self._ops if self.availability(required)[0] else None

    def require(self, required: str):
        """``torch.ops.<namespace>``; RuntimeError with the reason when ``required`` is missing."""
        if self._has.get(required) == "":  # the common case, on every kernel call
            return self._ops
        ok, why = self.availability(required)
        if not ok:
            raise RuntimeError(f"{self.module} is not available: {why}")
        return self._ops

    def kernel(self, name: str):
        """The fastest way to call op ``name``: the module's pybind11 binding of the same C++
        function where the build has one (csrc/cpu/torch_entry_points.h: no dispatcher boxing of
        the arguments, ~2 us less a call), else the op's default overload. RuntimeError as
        :meth:`require` when the op is missing. For real tensors only (the glue inside the ops'
        bodies and the plain eager path): FakeTensors and tracing need the op itself."""
        fn = self._kernels.get(name)
        if fn is None:
            ops = self.require(name)
            module = sys.modules.get(self.module)
            fn = getattr(module, name, None) or getattr(ops, name).default
            self._kernels[name] = fn
        return fn

    def family_accessors(self, module_name: str, required: str, isa_op: str):
        """``(is_available, __getattr__, cpu_isa)`` for a family's glue module ``module_name``:
        whether ``required`` is registered, a module ``__getattr__`` giving ``LOAD_ERROR`` (why the
        extension is unavailable, "" when it loads), and the name of the code path the family's
        kernels use now (the ``isa_op`` op: "amx", "avx512_bf16", "avx512", "avx2", "scalar", or
        "amx_emulated" when forced)."""

        def is_available() -> bool:
            return self.availability(required)[0]

        def module_getattr(name: str):
            if name == "LOAD_ERROR":
                return self.availability(required)[1]
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

        def cpu_isa() -> str:
            return getattr(self.require(required), isa_op)()

        return is_available, module_getattr, cpu_isa


CPU = Extension("mmkernels._C", "mmkernels_C")
CUDA = Extension("mmkernels._cuda", "mmkernels_cuda")


# --- CPU class ------------------------------------------------------------------------------------

_CPU_CLASS: Optional[str] = None
CPU_CLASSES = ("amx", "avx512", "avx2", "scalar")


@functools.lru_cache(maxsize=None)
def _cpuinfo_field(name: str) -> str:
    """The first ``name`` line of /proc/cpuinfo ("flags", "vendor_id", "model name"), or "" (read
    once per field and process: ~30 us a read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set:
    return set(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """ "intel", "amd" or "" (unknown), from /proc/cpuinfo's vendor_id: the CPU classes say which
    instructions a CPU has, not whose it is (our measurements of "avx512" are AMD Zen 4 / 5 only)."""
    vendor = _cpuinfo_field("vendor_id")
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "")


def cpu_family() -> int:
    """/proc/cpuinfo's "cpu family" (AMD: 25 = Zen 3 / 4, 26 = Zen 5), 0 when unknown."""
    value = _cpuinfo_field("cpu family")
    return int(value) if value.isdigit() else 0


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else platform.processor()), for calibration caches."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_class() -> str:
    """This machine's CPU class for auto-selection rules: "amx" (AMX-BF16 tiles: torch's oneDNN
    bf16 / fp32 paths), else "avx512", "avx2" or "scalar". ``MMKERNELS_CPU_CLASS`` overrides the
    probe (read once per process, like the probe itself)."""
    global _CPU_CLASS
    if _CPU_CLASS is None:
        forced = os.environ.get("MMKERNELS_CPU_CLASS", "").strip().lower()
        if forced in CPU_CLASSES:
            _CPU_CLASS = forced
        else:
            flags = _cpu_flags()
            if {"amx_bf16", "amx_tile"} <= flags:
                _CPU_CLASS = "amx"
            elif "avx512f" in flags:
                _CPU_CLASS = "avx512"
            elif "avx2" in flags:
                _CPU_CLASS = "avx2"
            else:
                cap = str(torch.backends.cpu.get_cpu_capability()).lower()
                _CPU_CLASS = "avx512" if "avx512" in cap else "avx2" if "avx2" in cap else "scalar"
    return _CPU_CLASS
