"""Glue from the token-reduction primitives (reference.py signatures) to the C++ CPU kernels.

The kernels live in the extension ``mmkernels._C`` (csrc/cpu/reduce*.cpp, registered as
``torch.ops.mmkernels_C.reduce_*``):

* ``reduce_tome_plan``: the whole plan in one call: fp32 L2 normalisation, tiled max / first argmax
  of the cosine similarity (AVX-512 or AVX2 FMA; the |A| x |B| matrix is never stored), exact top-r by
  unique (similarity, position) keys, the four index maps. Any metric strides.
* ``reduce_tome_merge``: size-weighted mean per output slot, fp32 accumulation in token order
  (bit-identical to the reference for float32 / bfloat16 / float16 ``x``).
* ``reduce_gather_rows``: row copies by element size (``tome_unmerge``, ``gather_tokens``).
* ``reduce_select_tokens``: exact top-k with ties to the lower index, ascending output.

float64 ``metric`` / ``x`` are left to the reference (the spec runs in float64 in tests). OpenMP
over batch rows (and over A tokens / output slots when the batch is small); the code path
(AVX-512, AVX2 or scalar) is chosen from CPUID on every call, ``MMKERNELS_CPU_ISA`` lowers it.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._extension import CPU as _EXT

REQUIRED_OP = "reduce_tome_plan"


# is_available(), LOAD_ERROR (module attribute) and cpu_isa(), as for every family's glue.
is_available, __getattr__, cpu_isa = _EXT.family_accessors(__name__, REQUIRED_OP, "reduce_cpu_isa")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along channels; batch/token strides are used as given."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def tome_plan(metric: torch.Tensor, r: int, protect_first: int = 1):
    return _EXT.require(REQUIRED_OP).reduce_tome_plan(metric, r, protect_first)


def tome_merge(
    x: torch.Tensor, src_to_out: torch.Tensor, n_out: int, size: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _EXT.require(REQUIRED_OP).reduce_tome_merge(_rows(x), src_to_out.long(), n_out, size)


def tome_unmerge(x_out: torch.Tensor, src_to_out: torch.Tensor) -> torch.Tensor:
    return _EXT.require(REQUIRED_OP).reduce_gather_rows(_rows(x_out), src_to_out.long())


def select_tokens(scores: torch.Tensor, k: int, protect_first: int = 1) -> torch.Tensor:
    return _EXT.require(REQUIRED_OP).reduce_select_tokens(scores, k, protect_first)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _EXT.require(REQUIRED_OP).reduce_gather_rows(_rows(x), idx.long())
