"""The host allocator setting (hstu.training.host_memory): a freed large buffer is reused by
the next allocation of its size instead of being mapped afresh (page faults every step)."""

import os
import subprocess
import sys

import pytest

_PROBE = r"""
import resource, sys
import numpy as np
from hstu.training.host_memory import keep_freed_host_memory
print("applied", keep_freed_host_memory())
def touch():
    # a step's buffers: several 16 MiB arrays alive at once, then all freed (as the data
    # path's draw, index and transpose); glibc by default trims the freed heap top
    bufs = [np.empty(16 * 2**20, dtype=np.uint8) for _ in range(3)]
    for b in bufs:
        b.fill(1)
    del bufs
touch(); touch()  # settle the dynamic mmap threshold glibc keeps by default
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(keep: str) -> tuple[str, int]:
    env = dict(os.environ, HSTU_KEEP_FREED_HOST_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True).stdout
    lines = dict(line.split() for line in out.splitlines())
    return lines["applied"], int(lines["faults"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is a glibc (Linux) setting")
def test_freed_buffers_are_reused_without_page_faults():
    applied, faults = _probe("1")
    off, faults_off = _probe("0")
    assert (applied, off) == ("True", "False")
    pages = 5 * 3 * 16 * 2**20 // 4096  # what touching fresh pages every time would cost
    assert faults < pages // 100, (faults, faults_off)
    # without the setting glibc hands the memory back and faults it in again
    assert faults_off > pages // 20, (faults, faults_off)
