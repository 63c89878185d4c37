"""Family-folder hooks: see tests/declared_limits.py (declared-scope peer backends skip, not fail,
the cases they declare they do not serve)."""

from declared_limits import pytest_runtest_call  # noqa: F401
