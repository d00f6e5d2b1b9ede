"""Fixtures shared by the test folders."""

from __future__ import annotations

import gin
import pytest


@pytest.fixture
def clean_gin():
    """gin's bindings cleared before and after the test (tests that parse configs)."""
    gin.clear_config()
    yield
    gin.clear_config()
