"""Backends of the token-reduction primitives. Only the reference exists so far; the fused CPU
(C++) and Triton kernels register here with the same names as the attention backends."""
from __future__ import annotations

from .. import _dispatch
from . import reference

OPS = {
    "tome_plan": reference.tome_plan,
    "tome_merge": reference.tome_merge,
    "tome_unmerge": reference.tome_unmerge,
    "select_tokens": reference.select_tokens,
    "gather_tokens": reference.gather_tokens,
}

for _op, _fn in OPS.items():
    _dispatch.register(_op, _dispatch.Backend(
        name="reference", run=_fn, unsupported=lambda call: [],
        capabilities={"devices": "any", "dtypes": "any floating", "head dims": "-",
                      "notes": "plain PyTorch (the spec)"}))
