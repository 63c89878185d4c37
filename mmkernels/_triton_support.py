"""Triton, when it can be imported, and the mode helpers every Triton backend shares."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

try:  # Triton is optional: is_available() reports why a Triton backend cannot run
    import triton
    import triton.language as tl

    IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def interpreter_active() -> bool:
    """True when Triton's interpreter is requested through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> Tuple[bool, str]:
    """(True, "") when Triton kernels can run at all, else (False, reason)."""
    if triton is None:
        return False, f"triton is not importable ({IMPORT_ERROR})"
    return True, ""


@dataclass(frozen=True)
class CompileTarget:
    """One kernel variant a launcher can pick, for the AOT compile gate (mmkernels/compile_gate.py).

    ``signature`` / ``constexprs`` / ``attrs`` are what ``triton.compiler.ASTSource`` takes; they
    reproduce what Triton's JIT specialises for the common case (last-dim strides == 1 ->
    constexpr; pointers and other strides divisible by 16 -> marked), the vectorised,
    register-heaviest form. ``module`` names the Python module whose ``compiled_kernel(name)``
    returns the (compiled, not interpreted) ``@triton.jit`` function; ``label`` is the gate's
    variant column when set.
    """

    kernel: str
    variant: str
    dtype: str
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    module: str
    attrs: Dict[Tuple[int, ...], list] = field(hash=False, compare=False)
    num_warps: int = 4
    num_stages: int = 2
    capability: int = 80
    needs_tensor_cores: bool = False
    label: str = ""
    # SASS tensor-core instructions that satisfy needs_tensor_cores (compile_gate.tensor_core_ops
    # names, e.g. ("IMMA", "IGMMA") for an int8 dot); empty: HMMA or HGMMA.
    tensor_core_ops: Tuple[str, ...] = ()

    def resolve(self):
        return importlib.import_module(self.module).compiled_kernel(self.kernel)
