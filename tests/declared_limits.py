"""Peer backends with a declared, narrower scope (the ``torch`` backend: SDPA serves no causal /
scores / varlen attention, ``torch._int_mm`` no weight-only qmatmul) run every parametrised test;
a case that uses what such a backend declares it does not serve is *skipped* with the declared
reason (the NoBackendError it raises), not failed. Our own backends (reference, cpu, triton, cuda)
are never skipped this way: a refusal there stays a failure.

Imported by the conftest.py of each family folder that has such a backend.
"""

import pytest

from mmkernels import _dispatch

NARROW_BACKENDS = ("torch",)


def _backend_param(item):
    callspec = getattr(item, "callspec", None)
    for value in callspec.params.values() if callspec is not None else ():
        head = value[0] if isinstance(value, tuple) and value else value
        name = getattr(head, "name", head)  # BackendUnderTest or a plain name
        if isinstance(name, str) and name in NARROW_BACKENDS:
            return name
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except _dispatch.NoBackendError as exc:
        name = _backend_param(item)
        prefix = f"asked for backend {name!r}, which cannot run "
        first = str(exc).split("\n", 1)[0]
        if name is None or prefix not in first:
            raise
        pytest.skip(f"{name} declares it does not serve this case: {first.split(prefix, 1)[1]}")
