"""Loading the compiled extension ``mmkernels._C`` once, for every C++ CPU backend."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_OPS = None
_ERROR: Optional[str] = None
_TRIED = False


def cpu_ops(required: str) -> Tuple[Optional[object], str]:
    """``(torch.ops.mmkernels_C, "")`` when the extension imports and registers ``required``;
    ``(None, reason)`` otherwise (not built, a broken .so, or a build without that op)."""
    global _OPS, _ERROR, _TRIED
    if not _TRIED:
        _TRIED = True
        try:
            import mmkernels._C  # noqa: F401  (registers torch.ops.mmkernels_C)

            _OPS = torch.ops.mmkernels_C
        except Exception as exc:  # ImportError, OSError (bad .so)
            _ERROR = f"{type(exc).__name__}: {exc}"
    if _OPS is None:
        return None, _ERROR or "mmkernels._C did not load"
    try:
        getattr(_OPS, required)
    except (AttributeError, RuntimeError) as exc:
        return None, f"this build of mmkernels._C has no {required} ({type(exc).__name__})"
    return _OPS, ""
