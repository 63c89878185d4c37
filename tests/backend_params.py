"""The backends a family's tests run on, read from the dispatch registry (used by conftest's
``backend`` fixture; importable by a test that parametrises by hand, e.g. a hypothesis test)."""

import importlib
from typing import List, NamedTuple, Optional

import pytest
import torch

from mmkernels import _dispatch

ISA_ORDER = ["scalar", "avx2", "avx512", "avx512_bf16"]

# The op whose registered backends a family's ``backend`` fixture follows (by the test file's folder,
# tests/<family>/); a test module may name another op with ``BACKEND_OP = "..."``.
FAMILY_OPS = {"attention": "attention", "reduce": "tome_plan", "quant": "qmatmul"}


class BackendUnderTest(NamedTuple):
    """What the ``backend`` fixture yields: a registered backend's name (pass it as ``backend=``)
    and the device its inputs go on (``name, device = backend`` unpacks it)."""

    name: str
    device: str


def _device(b) -> str:
    devices = getattr(b, "devices", None)  # None: any device
    if devices is not None and "cpu" not in devices:
        return "cuda"
    if b.name != "reference" and torch.cuda.is_available() and (devices is None or "cuda" in devices):
        return "cuda"
    return "cpu"  # triton without a GPU: the interpreter


def cpu_isa_paths(family: str) -> List[str]:
    """The ISA paths of ``mmkernels.<family>.cpu`` this CPU can run, lowest first."""
    cpu = importlib.import_module(f"mmkernels.{family}.cpu")
    return ISA_ORDER[: ISA_ORDER.index(cpu.cpu_isa()) + 1]


def backend_cases(op: str, isa_family: Optional[str] = None) -> list:
    """``pytest.param((BackendUnderTest, isa or None), id=...)`` for every backend registered for
    ``op``, in the registry's order: an unavailable one (not built, no GPU) is a skipped param
    with the reason. With ``isa_family`` the cpu backend runs once per ISA path
    (:func:`cpu_isa_paths`, forced with MMKERNELS_CPU_ISA by the fixture)."""
    params = []
    for b in _dispatch.backends_for(op):
        ok, why = b.availability()
        value = BackendUnderTest(b.name, _device(b))
        if ok and value.device == "cuda" and not torch.cuda.is_available():
            ok, why = False, "needs a CUDA GPU"
        if not ok:
            params.append(
                pytest.param(
                    (value, None), id=b.name, marks=pytest.mark.skip(reason=f"{b.name} backend unavailable: {why}")
                )
            )
        elif b.name == "cpu" and isa_family is not None:
            params += [pytest.param((value, isa), id=f"cpu-{isa}") for isa in cpu_isa_paths(isa_family)]
        else:
            params.append(pytest.param((value, None), id=b.name))
    return params
