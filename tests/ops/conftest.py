"""Fixtures for the kernel tests.

Triton decides at kernel decoration time whether to compile or to interpret, so on a host
without CUDA the ``triton_backend`` fixture sets TRITON_INTERPRET=1 for its tests only and
(re)loads hstu.ops.triton_attention to match; the variable is restored afterwards, so other
test folders see the environment they started with.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from hstu.ops.backends import triton_module


@pytest.fixture(scope="module")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def triton_backend(device: str) -> Iterator[ModuleType]:
    pytest.importorskip("triton")
    with pytest.MonkeyPatch.context() as patch:
        if device == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        yield triton_module()
