"""Shared test set-up: every backend is exercised by the same parametrised tests.

* Without a GPU, Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1 must
  be set before triton is first imported, hence here).
* MMKERNELS_DEBUG_POISON=1 makes the op fill its outputs with NaN before the backend runs, so a
  backend that forgets to write an element fails the comparison.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["MMKERNELS_DEBUG_POISON"] = "1"
os.environ.pop("MMKERNELS_BACKEND", None)
os.environ.pop("MMKERNELS_ATTENTION_BACKEND", None)

import mmkernels  # noqa: E402,F401  (loads the extension after the environment is set)
from mmkernels import _dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _available(op, name):
    for b in _dispatch.backends_for(op):
        if b.name == name:
            return b.availability()
    return False, "not registered"


def attention_backends():
    """(backend name, device) pairs that can run here, each a pytest param (skipped if absent)."""
    params = []
    for name, device in (("reference", "cpu"), ("cpu", "cpu"), ("triton", DEVICE)):
        ok, why = _available("attention", name)
        marks = [] if ok else [pytest.mark.skip(reason=f"{name} backend unavailable: {why}")]
        params.append(pytest.param((name, device), id=name, marks=marks))
    if torch.cuda.is_available():
        ok, why = _available("attention", "cuda")
        marks = [] if ok else [pytest.mark.skip(reason=f"cuda backend unavailable: {why}")]
        params.append(pytest.param(("cuda", "cuda"), id="cuda", marks=marks))
    return params


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
