"""When a public function may skip its ``torch.library`` custom op and call the op's body directly.

Each family's public functions (``attention``, ``qmatmul``, the token-reduction primitives) run
through a custom op so that autograd, ``torch.compile`` / ``torch.export``, tensor subclasses,
modes and functorch transforms see one opaque op with a fake implementation. In plain eager
inference none of them is involved, and the op's dispatch alone costs ~10 us a call (AMD Zen 5:
``mmkernels.attention`` at MiniLM's batch 1 x 8 tokens, 33 -> 19 us; the kernel itself ~6 us),
a share that made small patched models slower than unpatched ones. :func:`plain_eager` says when
calling the body directly is exactly what the op would do.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_functorch_level = torch._C._functorch.maybe_current_level
_function_modes = torch._C._len_torch_function_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack
_profiling = torch._C._autograd._profiler_enabled
_Parameter = torch.nn.Parameter


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """True when no part of PyTorch needs to see the custom op for a call on ``tensors`` (None
    entries are skipped): not compiling or tracing (torch.compile, torch.export, torch.jit.trace),
    every tensor a plain ``torch.Tensor`` or exactly ``nn.Parameter`` (whose ``__torch_function__``
    is disabled, so every op sees a plain tensor: a layer's weight; no FakeTensor, DTensor, other
    subclass or subclass of Parameter), no gradient
    to record, no TorchFunctionMode or TorchDispatchMode active (``with torch.device(...)``, fake
    or meta modes, FlopCounterMode), no functorch transform (vmap, grad) and no profiler (which
    records the op's event)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and ((type(t) is not Tensor and type(t) is not _Parameter) or (grad and t.requires_grad)):
            return False
    return not (_function_modes() or _dispatch_modes() or _functorch_level() is not None or _profiling())
