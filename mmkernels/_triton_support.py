"""Triton, when it can be imported, and the mode helpers every Triton backend shares."""
from __future__ import annotations

import os
from typing import Optional, Tuple

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
