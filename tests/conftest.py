"""Fixtures shared by the test folders."""

from __future__ import annotations

import gin
import pytest
import torch.distributed as dist


@pytest.fixture
def clean_gin():
    """gin's bindings cleared before and after the test (tests that parse configs)."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def plain_process(monkeypatch):
    """A plain python process (not under torchrun), gin cleared around the test."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone, torn down after the test."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()
