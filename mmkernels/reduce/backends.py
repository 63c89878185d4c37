"""Backends of the token-reduction primitives, declared as data (mmkernels._dispatch.Backend).

Priority for auto-selection (first capable wins): CUDA tensors -> triton, reference; CPU tensors ->
cpu (the C++ kernels of mmkernels._C), reference. The Triton backend also runs CPU tensors under
``TRITON_INTERPRET=1``, but only when asked for explicitly (that is how it is tested without a
GPU), as for attention. float64 metrics go to the reference (tome_plan's Triton kernel takes
float16 / bfloat16 / float32; the cpu backend leaves float64 metric / x to the reference too).
"""

from __future__ import annotations

import importlib
from typing import List

from .. import _dispatch
from .._extension import CPU as _EXT

OPS = ("tome_plan", "tome_merge", "tome_unmerge", "select_tokens", "gather_tokens")

_HALF_AND_UP = ("float16", "bfloat16", "float32")
_FLOATS = _HALF_AND_UP + ("float64",)
_F64_TO_REFERENCE = {"float64": "float64 is served by the reference (the kernel computes in float32)"}

# Per op: (dtypes, dtype_notes) of each backend; None: any dtype (row copies).
_TRITON_DTYPES = {
    "tome_plan": (_HALF_AND_UP, _F64_TO_REFERENCE),
    "tome_merge": (_FLOATS, {}),
    "select_tokens": (_FLOATS, {}),
    "tome_unmerge": (None, {}),
    "gather_tokens": (None, {}),
}
_CPU_DTYPES = {
    "tome_plan": (_HALF_AND_UP, _F64_TO_REFERENCE),
    "tome_merge": (_HALF_AND_UP, _F64_TO_REFERENCE),
    "select_tokens": (_FLOATS, {}),
    "tome_unmerge": (None, {}),
    "gather_tokens": (None, {}),
}

_TRITON_NOTES = {
    "tome_plan": "tiled max/argmax of cosine similarity (no |A|x|B| matrix), exact rank-count top-r",
    "tome_merge": "one program per slot block walks a CSR of its sources (deterministic)",
    "tome_unmerge": "row gather (real dtypes of 1/2/4/8 bytes)",
    "select_tokens": "exact rank counting + prefix-sum compaction (no sort)",
    "gather_tokens": "row gather (real dtypes of 1/2/4/8 bytes), out-of-range rows read as zeros",
}
_CPU_NOTES = {
    "tome_plan": "one call: fp32 normalise, tiled FMA max/argmax (no |A|x|B| matrix), exact top-r by nth_element",
    "tome_merge": "fp32 accumulation in token order (bit-identical to the reference)",
    "tome_unmerge": "row memcpy",
    "select_tokens": "exact top-k by nth_element on (score, index) keys",
    "gather_tokens": "row memcpy",
}


def _triton_availability():
    from .._triton_support import is_available

    return is_available()


def _triton_check(op: str):
    def check(call) -> List[str]:
        """Row copies take real dtypes of 1, 2, 4 or 8 bytes; CPU tensors need the interpreter."""
        reasons = []
        if op in ("tome_unmerge", "gather_tokens"):
            import torch

            dtype = getattr(torch, call.dtype_name, None)
            if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype.itemsize not in (1, 2, 4, 8):
                reasons.append(f"dtype {call.dtype_name} not supported (real dtypes of 1, 2, 4 or 8 bytes)")
        mod = importlib.import_module("mmkernels.reduce.triton")
        if call.device_type == "cpu" and not mod._module_is_interpreted():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before triton is first imported")
        return reasons

    return check


# Registration order is the auto-selection priority.
for _op in OPS:
    _dispatch.define_op(_op)
    _dtypes, _notes = _TRITON_DTYPES[_op]
    _dispatch.register(
        _op,
        _dispatch.Backend(
            "triton",
            f"mmkernels.reduce.triton:{_op}",
            devices=("cuda", "cpu"),
            auto_devices=("cuda",),
            dtypes=_dtypes,
            dtype_notes=_notes,
            check=_triton_check(_op),
            availability=_triton_availability,
            devices_note="cpu under TRITON_INTERPRET=1, when asked for",
            notes=_TRITON_NOTES[_op],
        ),
    )
    _dtypes, _notes = _CPU_DTYPES[_op]
    _dispatch.register(
        _op,
        _dispatch.Backend(
            "cpu",
            f"mmkernels.reduce.cpu:{_op}",
            devices=("cpu",),
            dtypes=_dtypes,
            dtype_notes=_notes,
            availability=lambda: _EXT.availability("reduce_tome_plan"),
            notes=_CPU_NOTES[_op] + "; OpenMP, AVX-512 / AVX2 / scalar chosen at run time",
        ),
    )
    _dispatch.register(
        _op,
        _dispatch.Backend(
            "reference", f"mmkernels.reduce.reference:{_op}", devices=None, notes="plain PyTorch (the spec)"
        ),
    )
