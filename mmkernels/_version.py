"""The package version (pyproject.toml's), importable from any layer without importing the package."""

__version__ = "0.1.0"
