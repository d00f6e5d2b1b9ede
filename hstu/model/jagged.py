"""Jagged-index helpers (values + lengths/offsets, no padding) over FBGEMM's sparse ops.

Legend: B samples, T = sum(lengths) elements, lengths int64 [B], offsets int64 [B+1].

``total`` (T) is passed in, from a shape or the batch's host-side sizes
(:class:`hstu.data.batch.BatchSizes`): reading it from the lengths, or letting an op size its
output, would make the host wait for the device on CUDA.
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, CPU and CUDA)
import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[B] -> [B+1] exclusive prefix sum, starting at 0."""
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)


def segment_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """[B] -> [T]: the sample of each element (``total`` = T = sum(lengths))."""
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total
    )


def index_within(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """[B] -> [T]: each element's index inside its sample (``total`` = T = sum(lengths))."""
    return torch.ops.fbgemm.offsets_range(lengths_to_offsets(lengths), total)


def positions_within(
    offsets: torch.Tensor, num_targets: torch.Tensor | None, total: int
) -> torch.Tensor:
    """[T] position of each token; the num_targets last tokens share the first one's
    (``total`` = T = offsets[-1])."""
    pos = torch.ops.fbgemm.offsets_range(offsets, total)
    if num_targets is None:
        return pos
    lengths = offsets[1:] - offsets[:-1]
    first_target = torch.repeat_interleave(lengths - num_targets, lengths, output_size=total)
    return torch.minimum(pos, first_target)


__all__ = ["index_within", "lengths_to_offsets", "positions_within", "segment_ids"]
