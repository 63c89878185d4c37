"""Backends of the token-reduction primitives.

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
from . import reference

OPS = ("tome_plan", "tome_merge", "tome_unmerge", "select_tokens", "gather_tokens")


def _triton_module():
    return importlib.import_module("mmkernels.reduce.triton")


def _cpu_module():
    return importlib.import_module("mmkernels.reduce.cpu")


# --- cpu (C++ extension) ----------------------------------------------------------------------

def _cpu_availability():
    try:
        mod = _cpu_module()
    except ImportError as exc:
        return False, f"mmkernels.reduce.cpu failed to import ({exc})"
    if mod.is_available():
        return True, ""
    return False, f"the C++ extension mmkernels._C has no reduce kernels ({mod.LOAD_ERROR})"


def _cpu_unsupported(op: str):
    def unsupported(call) -> List[str]:
        ok, why = _cpu_module().supports(op, call.dtype_name, call.device_type)
        return [] if ok else [why]
    return unsupported


def _cpu_run(op: str):
    fn = None

    def run(*args):
        nonlocal fn
        if fn is None:
            fn = getattr(_cpu_module(), op)
        return fn(*args)
    return run


_CPU_DTYPES = {"tome_plan": "float32, bfloat16, float16 (float64 -> reference)",
               "tome_merge": "float32, bfloat16, float16 (float64 -> reference)",
               "select_tokens": "float32, bfloat16, float16, float64",
               "tome_unmerge": "any (row copies)",
               "gather_tokens": "any (row copies)"}
_CPU_NOTES = {"tome_plan": "one call: fp32 normalise, tiled AVX-512 FMA max/argmax "
                           "(no |A|x|B| matrix), exact top-r by nth_element",
              "tome_merge": "fp32 accumulation in token order (bit-identical to the reference)",
              "tome_unmerge": "row memcpy",
              "select_tokens": "exact top-k by nth_element on (score, index) keys",
              "gather_tokens": "row memcpy"}


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
        name="cpu", run=_cpu_run(_op), unsupported=_cpu_unsupported(_op),
        availability=_cpu_availability, auto_devices=("cpu",),
        capabilities={"devices": "cpu", "dtypes": _CPU_DTYPES[_op], "head dims": "-",
                      "notes": _CPU_NOTES[_op] + "; OpenMP, AVX-512 / scalar chosen at run time"}))
    _dispatch.register(_op, _dispatch.Backend(
        name="reference", run=getattr(reference, _op), unsupported=lambda call: [],
        capabilities={"devices": "any", "dtypes": "any floating", "head dims": "-",
                      "notes": "plain PyTorch (the spec)"}))
