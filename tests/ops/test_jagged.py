"""Jagged index helpers against per-sample Python loops (empty samples included)."""

from __future__ import annotations

import pytest
import torch

from hstu.ops.jagged import index_within, lengths_to_offsets, positions_within, segment_ids

LENGTHS = [3, 0, 1, 4, 0, 2]


def _reference(lengths: list[int], num_targets: list[int] | None):
    offsets, seg, within, pos = [0], [], [], []
    for b, n in enumerate(lengths):
        offsets.append(offsets[-1] + n)
        for j in range(n):
            seg.append(b)
            within.append(j)
            # the last num_targets tokens of a sample share the first target's position
            first_target = n - num_targets[b] if num_targets is not None else n
            pos.append(min(j, first_target))
    return offsets, seg, within, pos


@pytest.mark.parametrize("lengths", [LENGTHS, [5], [0, 0], [1, 1, 1]])
def test_offsets_segments_and_indices(lengths):
    offsets, seg, within, _ = _reference(lengths, None)
    t = torch.tensor(lengths, dtype=torch.int64)
    total = sum(lengths)
    got = lengths_to_offsets(t)
    assert got.dtype == torch.int64 and got.tolist() == offsets
    assert segment_ids(t, total).tolist() == seg
    assert index_within(t, total).tolist() == within


@pytest.mark.parametrize("num_targets", [None, [1, 0, 1, 2, 0, 2], [0, 0, 0, 0, 0, 0]])
def test_positions_within_share_the_first_targets_position(num_targets):
    offsets, _, _, pos = _reference(LENGTHS, num_targets)
    nt = None if num_targets is None else torch.tensor(num_targets, dtype=torch.int64)
    got = positions_within(torch.tensor(offsets, dtype=torch.int64), nt, sum(LENGTHS))
    assert got.tolist() == pos
