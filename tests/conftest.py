"""Shared test set-up: every backend is exercised by the same parametrised tests.

* Without a GPU, Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1 must
  be set before triton is first imported, hence here).
* ``backend``: one fixture for every op family; a test that takes it runs on each backend the
  dispatch registry holds for the family's op, an unavailable one skipped with its reason.
* MMKERNELS_DEBUG_POISON=1 makes the op fill its outputs with NaN before the backend runs, so a
  backend that forgets to write an element fails the comparison.
* MMKERNELS_CALIBRATE=0: auto-selection follows the CPU-class rules, never a timing (the tests of
  mmkernels._calibration turn it on themselves); MMKERNELS_CACHE_DIR points at a directory of this
  session, so no test (nor a CLI it runs) writes into the real ~/.cache.
"""

import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["MMKERNELS_DEBUG_POISON"] = "1"
os.environ.pop("MMKERNELS_BACKEND", None)
os.environ.pop("MMKERNELS_ATTENTION_BACKEND", None)
os.environ["MMKERNELS_CALIBRATE"] = "0"
_CACHE_DIR = os.environ["MMKERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmkernels-test-cache-")

import mmkernels  # noqa: E402,F401  (loads the extension after the environment is set)
from backend_params import FAMILY_OPS, BackendUnderTest, backend_cases  # noqa: E402


def _parametrized_by_the_test(metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    """A test that takes ``backend`` runs on every backend its family's op has registered (or
    the module's ``BACKEND_OP``); ``EVERY_CPU_ISA = True`` in the module adds one run per ISA
    path of the cpu backend."""
    if "backend" not in metafunc.fixturenames or _parametrized_by_the_test(metafunc, "backend"):
        return
    module = metafunc.module
    family = Path(module.__file__).parent.name
    op = getattr(module, "BACKEND_OP", None) or FAMILY_OPS.get(family)
    if op is None:
        return
    isa_family = family if getattr(module, "EVERY_CPU_ISA", False) else None
    metafunc.parametrize("backend", backend_cases(op, isa_family), indirect=True)


@pytest.fixture
def backend(request, monkeypatch) -> BackendUnderTest:
    """The backend under test (parametrised by :func:`pytest_generate_tests`)."""
    value, isa = request.param
    if isa is not None:
        monkeypatch.setenv("MMKERNELS_CPU_ISA", isa)
    return value


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cpu_class(monkeypatch):
    """``cpu_class(name)`` makes this process's CPU class ``name`` ("amx", "avx512", ...) for the
    test, with the selection cache cleared (the torch backend's auto-selection rule follows it)."""
    from mmkernels import _dispatch, _extension

    def set_class(name):
        monkeypatch.setattr(_extension, "_CPU_CLASS", name)
        _dispatch.clear_selection_cache()

    yield set_class
    _dispatch.clear_selection_cache()


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
