"""Backends of ``qmatmul``. For now only the reference (plain PyTorch, any device / dtype);
compiled backends (cpu, triton, cuda) register here ahead of it, in priority order."""
from __future__ import annotations

from .. import _dispatch
from . import reference

_dispatch.register("qmatmul", _dispatch.Backend(
    name="reference", run=reference.qmatmul_tensors, unsupported=lambda call: [],
    capabilities={"devices": "any", "dtypes": "float32, bfloat16, float16, float64",
                  "head dims": "-",
                  "notes": "plain PyTorch (the spec): dequantize + matmul; W8A8 via exact integer "
                           "products"}))
