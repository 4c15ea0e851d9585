"""Fixtures for the end-to-end tests."""

import pytest

from tests.e2e.tools import require_tool


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool (Debian package `prometheus`)."""
    return require_tool("promtool", "prometheus")
