"""Small jagged-index helpers (values + lengths/offsets, no padding).

Legend: B samples, T = sum(lengths) elements, lengths int64 [B], offsets int64 [B+1].

``total`` (T) is passed in, from a shape or the batch's host-side sizes
(:class:`hstu.data.batch.BatchSizes`): reading it from the lengths, or letting
``repeat_interleave`` size its output, would make the host wait for the device on CUDA.
Torch only, not fbgemm's equivalents: ``hstu.gpu_check`` loads the dense block without fbgemm.
"""

from __future__ import annotations

import torch


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[B] -> [B+1] exclusive prefix sum, starting at 0."""
    offsets = lengths.new_zeros(lengths.numel() + 1)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def segment_ids(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """[B] -> [T]: the sample of each element (``total`` = T = sum(lengths))."""
    # repeat_interleave of the repeats alone repeats each index i lengths[i] times
    return torch.repeat_interleave(lengths, output_size=total)


def index_within(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """[B] -> [T]: each element's index inside its sample (``total`` = T = sum(lengths))."""
    offsets = lengths_to_offsets(lengths)
    return torch.arange(total, device=lengths.device) - torch.repeat_interleave(
        offsets[:-1], lengths, output_size=total
    )


def positions_within(
    offsets: torch.Tensor, num_targets: torch.Tensor | None, total: int
) -> torch.Tensor:
    """[T] position of each token; the num_targets last tokens share the first one's
    (``total`` = T = offsets[-1])."""
    lengths = offsets[1:] - offsets[:-1]
    pos = index_within(lengths, total)
    if num_targets is None:
        return pos
    first_target = torch.repeat_interleave(lengths - num_targets, lengths, output_size=total)
    return torch.minimum(pos, first_target)


__all__ = ["index_within", "lengths_to_offsets", "positions_within", "segment_ids"]
