"""The quantized-matmul op layer: the packed weight layout (:mod:`.packing`), tensor quantizers
(:mod:`.quantize`), ``qmatmul`` (api, reference, backends) and the SQNR metric.

Layering: this package imports nothing above it (not :mod:`mmkernels.nn`, :mod:`mmkernels.compress`,
:mod:`mmkernels.hf` or the benchmarks; tests/test_layering.py checks it). Model-compression
workflows (GPTQ, SignRound, SmoothQuant search, ``quantize_model``, checkpoints, ONNX export) live
in :mod:`mmkernels.compress`, above this package and :mod:`mmkernels.nn`.
"""

from . import backends as _backends  # noqa: F401  (registers the backends)
from .api import qmatmul
from .metrics import sqnr
from .packing import QuantizedWeight, pack_int4, unpack_int4
from .quantize import quantize_weight, smoothquant_factors
from .reference import qmatmul_reference

__all__ = [
    "qmatmul",
    "QuantizedWeight",
    "quantize_weight",
    "smoothquant_factors",
    "qmatmul_reference",
    "sqnr",
    "pack_int4",
    "unpack_int4",
]
