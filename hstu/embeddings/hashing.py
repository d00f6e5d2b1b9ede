"""splitmix64 on int64 tensors: the hash behind dynamic tables' fresh rows, live draws and
admission sketch (wrapping arithmetic; the same values on every host and device)."""

from __future__ import annotations

import torch

# splitmix64's constants as int64 (each has its top bit set: minus 2**64)
GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit mixing hash on int64 tensors (wrapping arithmetic)."""
    z = x + GOLDEN
    z = (z ^ shr(z, 30)) * _MIX1
    z = (z ^ shr(z, 27)) * _MIX2
    return z ^ shr(z, 31)
