"""Admission counts of a dynamic table: a count-min sketch of the ids looked up without a row.

Legend: N distinct ids, K depth (rows of the sketch), W width (counters per row).

``DynamicEmbeddingArgs.admit_min_count`` > 1 gives an id a row only once it has been looked up
that many times (docs/embeddings.md, "Admission"). Counting every id ever seen exactly would
grow with the stream; the sketch is K x W int32 counters, fixed whatever the ids:

- an id's counter in row k is ``splitmix64(id ^ salt_k) mod W``; its estimate the smallest of
  its K counters;
- conservative update: adding c to an id raises each of its counters to at least
  (estimate + c), never more, so an estimate is never below the true count and exceeds it
  by at most e * M / W with probability 1 - e^-K (M: occurrences counted, Cormode and
  Muthukrishnan; the conservative update only lowers the excess);
- halving: whenever W occurrences have been counted since the last halving, every counter
  is halved (floor), so M stays within about 2 W and counts fade: an id must reach the
  admission count within about W occurrences of other not admitted ids (TinyLFU's reset).

The state (counters, occurrences since the last halving, halvings so far) is host memory,
saved with the table's remapper and identical on every rank: each step adds the step's ids
over all ranks (gathered by the remapper) in the same order.
"""

from __future__ import annotations

import torch
from torch import nn

from hstu.embeddings.hashing import GOLDEN, shr, splitmix64

_INT32_MAX = torch.iinfo(torch.int32).max


class CountMinSketch(nn.Module):
    """K x W int32 counters of int64 ids (module docstring)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        assert width >= 1 and depth >= 1
        self.width, self.depth = width, depth
        self.register_buffer("counters", torch.zeros(depth, width, dtype=torch.int32))
        self.register_buffer("occurrences", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_halvings", torch.zeros((), dtype=torch.int64))
        rows = torch.arange(1, depth + 1, dtype=torch.int64)
        self._salts = splitmix64(rows * GOLDEN)  # [K], a constant (not state)

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        """Host memory, as the remapper that holds it."""
        return self

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> each id's counter in each row: int64 [K, N]."""
        h = splitmix64(ids.to(torch.int64).unsqueeze(0) ^ self._salts.unsqueeze(1))
        return shr(h, 1) % self.width

    @torch.no_grad()
    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> estimated counts int64 [N] (never below the true count). Read only."""
        return self.counters.gather(1, self.columns(ids)).min(0).values.to(torch.int64)

    @torch.no_grad()
    def add(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Counts ``counts`` [N] more occurrences of the distinct ``ids`` [N]; returns their
        estimates after it, int64 [N] (before a halving this call may trigger)."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64)
        cols = self.columns(ids)
        before = self.counters.gather(1, cols).min(0).values.to(torch.int64)
        want = (before + counts).clamp(max=_INT32_MAX).to(torch.int32)
        self.counters.scatter_reduce_(1, cols, want.expand(self.depth, -1), reduce="amax")
        after = self.counters.gather(1, cols).min(0).values.to(torch.int64)
        self.occurrences += counts.sum()
        if int(self.occurrences) >= self.width:
            self.counters >>= 1
            self.occurrences.zero_()
            self.num_halvings += 1
        return after

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}"
