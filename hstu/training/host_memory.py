"""Host allocator settings for a training process: freed buffers stay with the process.

Every step allocates and frees the same large host buffers (the data thread's negatives, on
CPU the step's activations). glibc serves one above its mmap threshold with a fresh ``mmap``,
unmaps it on ``free`` and trims the heap's top, so the next step's buffer faults in new,
zeroed pages. ``keep_freed_host_memory`` raises the threshold to glibc's maximum and turns
trimming off: such buffers are reused from the heap, the process keeps its peak host memory
(the peak itself is unchanged). Only speed changes, never a value; the switch and its
measurement: docs/training.md ("Host settings"), docs/performance.md. On a C library other
than glibc there is nothing to set.
"""

from __future__ import annotations

import ctypes
import os
import sys

from hstu.training.host_settings import HostSettings

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# the largest threshold glibc accepts: HEAP_MAX_SIZE / 2 on 64-bit hosts
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_NEVER = 2**31 - 1

_applied: bool | None = None


def _is_glibc() -> bool:
    """Linux with glibc (musl, macOS and Windows have no ``mallopt`` of these semantics)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # the name is unknown outside glibc
        return False


def keep_freed_host_memory(enabled: bool | None = None) -> bool:
    """Applies the settings once per process (see the module docstring). True when set.
    ``enabled`` None: as HostSettings.from_env() says (HSTU_KEEP_FREED_HOST_MEMORY)."""
    global _applied
    if _applied is not None:
        return _applied
    if enabled is None:
        enabled = HostSettings.from_env().keep_freed_host_memory
    _applied = False
    if not enabled or not _is_glibc():
        return False
    # the process's own symbols include the C library's (no library search, no subprocess)
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
        and mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) == 1
    )
    if not ok:
        print(
            "[hstu] note: glibc mallopt refused the host allocator settings (mmap threshold "
            f"{_MMAP_THRESHOLD_MAX}, no trim); large host buffers are mapped afresh every step "
            "(slower, same results)",
            file=sys.stderr,
            flush=True,
        )
    _applied = ok
    return ok


__all__ = ["keep_freed_host_memory"]
