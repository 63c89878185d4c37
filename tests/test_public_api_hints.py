"""Every public entry point (``mmkernels.__all__``, ``mmkernels.hf``) carries type hints and a
docstring: the contract a user reads in their editor."""

import inspect

import pytest

import mmkernels
import mmkernels.hf


def _entry_points():
    for module in (mmkernels, mmkernels.hf):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                for attr, fn in vars(obj).items():
                    if inspect.isfunction(fn) and (not attr.startswith("_") or attr == "__init__"):
                        yield f"{module.__name__}.{name}.{attr}", fn
            elif callable(obj):
                yield f"{module.__name__}.{name}", inspect.unwrap(obj)


ENTRY_POINTS = dict(_entry_points())


def test_there_are_entry_points():
    assert "mmkernels.attention" in ENTRY_POINTS and "mmkernels.hf.patch" in ENTRY_POINTS


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_has_hints_and_a_docstring(name):
    fn = ENTRY_POINTS[name]
    signature = inspect.signature(fn)
    unhinted = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls")
        and p.annotation is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert not unhinted, f"{name}: parameters without a type hint: {unhinted}"
    if fn.__name__ != "__init__":
        assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"
        assert inspect.getdoc(fn), f"{name}: no docstring"
