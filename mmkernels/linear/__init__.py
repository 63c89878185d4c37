"""``linear``: a dense ``y = x @ W.T + b``, the op behind ``mmkernels.nn.Linear`` and
``mmkernels.patch(model, linear=True)``.

torch's float32 ``nn.Linear`` on x86 CPUs goes to MKL's SGEMM, which on AMD Zen 5 runs at about 37%
of the FMA peak (an AVX2 code path); the CPU backend runs the weight-only GEMM's AVX-512 / AVX2
micro-kernels on the weight prepacked once as their panels (cached per weight tensor), at float32
precision. Auto-selection keeps torch wherever ours is not measured faster on this machine
(backends.py). Layering: the op layer (imports nothing above it).
"""

from . import backends as _backends  # noqa: F401  (registers the backends)
from .api import linear
from .reference import linear_reference

__all__ = ["linear", "linear_reference"]
