"""The backends a parametrised test runs on: reference, the C++ CPU backend once per ISA path
(forced with MMKERNELS_CPU_ISA, so one machine tests its lower paths too) and Triton (the
interpreter without a GPU); an unavailable backend is a skipped param with its reason."""
from typing import Callable, List

import pytest

from mmkernels import _dispatch


def backend_params(op: str, cpu_isas: Callable[[], List[str]]) -> list:
    """``pytest.param((name, isa), id=...)`` for every backend of ``op``; ``cpu_isas()`` (called
    only when the cpu backend is available) lists the ISA paths to run."""
    avail = {b.name: b.availability() for b in _dispatch.backends_for(op)}
    params = [pytest.param(("reference", None), id="reference")]
    ok, why = avail.get("cpu", (False, "not registered"))
    if ok:
        params += [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in cpu_isas()]
    else:
        params.append(pytest.param(("cpu", None), id="cpu",
                                   marks=pytest.mark.skip(reason=f"cpu backend unavailable: {why}")))
    ok, why = avail.get("triton", (False, "not registered"))
    params.append(pytest.param(("triton", None), id="triton",
                               marks=[] if ok else pytest.mark.skip(reason=f"triton unavailable: {why}")))
    return params


def select_backend(request, monkeypatch):
    """In a fixture parametrised by :func:`backend_params`: force the param's ISA path; returns
    ``(name, isa)``."""
    name, isa = request.param
    if isa is not None:
        monkeypatch.setenv("MMKERNELS_CPU_ISA", isa)
    return name, isa
