"""Backends of the token-reduction primitives.

Priority for auto-selection (first capable wins): CUDA tensors -> triton, reference; CPU tensors ->
reference. The Triton backend also runs CPU tensors under ``TRITON_INTERPRET=1``, but only when asked for
explicitly (that is how it is tested without a GPU), as for attention. float64 metrics go to the
reference (tome_plan's Triton kernel takes float16 / bfloat16 / float32).
"""
from __future__ import annotations

import importlib
from typing import List

from .. import _dispatch
from . import reference

OPS = ("tome_plan", "tome_merge", "tome_unmerge", "select_tokens", "gather_tokens")


def _triton_module():
    return importlib.import_module("mmkernels.reduce.triton")


# --- triton ---------------------------------------------------------------------------------

def _triton_availability():
    try:
        mod = _triton_module()
    except ImportError as exc:
        return False, f"mmkernels.reduce.triton failed to import ({exc})"
    return mod.is_available()


def _triton_unsupported(op: str):
    def unsupported(call) -> List[str]:
        import torch

        dtype = getattr(torch, call.dtype_name, None)
        if dtype is None:
            return [f"dtype {call.dtype_name} not supported"]
        ok, why = _triton_module().supports(op, dtype, call.device_type)
        return [] if ok else [why]
    return unsupported


def _triton_run(op: str):
    def run(*args):
        return getattr(_triton_module(), op)(*args)
    return run


_TRITON_DTYPES = {"tome_plan": "float16, bfloat16, float32",
                  "tome_merge": "float16, bfloat16, float32, float64",
                  "select_tokens": "float16, bfloat16, float32, float64",
                  "tome_unmerge": "any 1/2/4/8-byte real dtype",
                  "gather_tokens": "any 1/2/4/8-byte real dtype"}
_TRITON_NOTES = {"tome_plan": "tiled max/argmax of cosine similarity (no |A|x|B| matrix), exact rank-count top-r",
                 "tome_merge": "one program per slot block walks a CSR of its sources (deterministic)",
                 "tome_unmerge": "row gather",
                 "select_tokens": "exact rank counting + prefix-sum compaction (no sort)",
                 "gather_tokens": "row gather, out-of-range rows read as zeros"}

# Registration order is the auto-selection priority.
for _op in OPS:
    _dispatch.register(_op, _dispatch.Backend(
        name="triton", run=_triton_run(_op), unsupported=_triton_unsupported(_op),
        availability=_triton_availability, auto_devices=("cuda",),
        capabilities={"devices": "cuda (cpu under TRITON_INTERPRET=1)", "dtypes": _TRITON_DTYPES[_op],
                      "head dims": "-", "notes": _TRITON_NOTES[_op]}))
    _dispatch.register(_op, _dispatch.Backend(
        name="reference", run=getattr(reference, _op), unsupported=lambda call: [],
        capabilities={"devices": "any", "dtypes": "any floating", "head dims": "-",
                      "notes": "plain PyTorch (the spec)"}))
