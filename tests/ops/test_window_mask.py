"""The semi-local window of ``hstu.ops.masks`` (max_attn_len W, min_full_attn_seq_len M):
hand-written masks, the vectorised mask against the pair-by-pair rule (whole and in blocks),
and Meta's reference mask function where the options coincide."""

from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch

from hstu.ops import dense_mask
from hstu.ops.masks import check_window

from .reference import naive_mask

# 9 tokens: 1 contextual, 6 history (1..6), 2 candidates (7, 8; groups of 1); W = 2, M = 0.
# History rows see themselves and 2 predecessors plus the contextual token; candidates count
# from position 7 (the first candidate), so both see 5, 6 and themselves.
HAND_WINDOW_2 = [
    # 0  1  2  3  4  5  6  7  8
    [1, 0, 0, 0, 0, 0, 0, 0, 0],  # 0 ctx
    [1, 1, 0, 0, 0, 0, 0, 0, 0],  # 1
    [1, 1, 1, 0, 0, 0, 0, 0, 0],  # 2
    [1, 1, 1, 1, 0, 0, 0, 0, 0],  # 3: 1, 2, 3
    [1, 0, 1, 1, 1, 0, 0, 0, 0],  # 4: 2, 3, 4 (and the contextual token)
    [1, 0, 0, 1, 1, 1, 0, 0, 0],  # 5
    [1, 0, 0, 0, 1, 1, 1, 0, 0],  # 6
    [1, 0, 0, 0, 0, 1, 1, 1, 0],  # 7 candidate at position 7: 5, 6
    [1, 0, 0, 0, 0, 1, 1, 0, 1],  # 8 candidate, also at position 7
]
# the same with M = 2: history rows 5, 6 and both candidates see the whole history
HAND_WINDOW_2_FULL_2 = [row[:] for row in HAND_WINDOW_2]
for _i in (5, 6, 7, 8):
    for _j in range(min(_i + 1, 7)):
        HAND_WINDOW_2_FULL_2[_i][_j] = 1


@pytest.mark.parametrize("full, expected", [(0, HAND_WINDOW_2), (2, HAND_WINDOW_2_FULL_2)])
def test_hand_written_window(full: int, expected: list[list[int]]) -> None:
    want = torch.tensor(expected, dtype=torch.bool)
    assert torch.equal(naive_mask(9, 1, 2, 1, True, "hstu", 2, full), want)
    got = dense_mask(torch.tensor([9]), torch.tensor([1]), torch.tensor([2]), 1, True, 9,
                     "hstu", 2, full)[0]
    assert torch.equal(got, want)


def test_peer_window_measures_contextual_keys_from_the_last_contextual_position() -> None:
    # "peer": contextual keys are at position C - 1 = 0, so history row 4 (distance 4) no
    # longer sees the contextual token under W = 2, while row 2 (distance 2) does
    got = dense_mask(torch.tensor([9]), torch.tensor([1]), torch.tensor([2]), 1, True, 9,
                     "peer", 2)[0]
    assert bool(got[2, 0]) and not bool(got[4, 0])
    # the other keys as under "hstu"; the contextual row sees the whole history ("peer")
    assert torch.equal(got[1:, 1:], torch.tensor(HAND_WINDOW_2, dtype=torch.bool)[1:, 1:])
    assert got[0, :7].all() and not got[0, 7:].any()


# window 4: a contextual row of the first sample is exactly 4 positions from its first
# candidate (pos C - 1 = 1, first candidate 5); M = 1 and 2: the smallest full-attention tails
CASES = list(itertools.product(
    [True, False], [1, 3], ["hstu", "peer"], [1, 3, 4, 20], [0, 1, 2],
))


@pytest.mark.parametrize("causal, group, convention, window, full", CASES)
def test_dense_mask_matches_rule_with_window(
    causal: bool, group: int, convention: str, window: int, full: int
) -> None:
    lengths = torch.tensor([9, 1, 13, 6])
    ctx = torch.tensor([2, 0, 4, 0])
    tgt = torch.tensor([4, 1, 5, 0])
    width = 15
    got = dense_mask(lengths, ctx, tgt, group, causal, width, convention, window, full)
    for s in range(len(lengths)):
        n = int(lengths[s])
        want = torch.zeros(width, width, dtype=torch.bool)
        want[:n, :n] = naive_mask(n, int(ctx[s]), int(tgt[s]), group, causal, convention,
                                  window, full)
        assert torch.equal(got[s], want), f"sample {s}"
    rows = torch.tensor([0, 3, 7, 12, 14])
    keys = torch.tensor([1, 2, 8, 11])
    block = dense_mask(lengths, ctx, tgt, group, causal, width, convention, window, full,
                       rows=rows, keys=keys)
    assert torch.equal(block, got[:, rows][:, :, keys])


@pytest.mark.parametrize("convention", ["hstu", "peer"])
def test_per_sample_rows_and_keys(convention: str) -> None:
    """rows [b, R] and keys [b, K]: each sample's own block of its whole mask."""
    lengths = torch.tensor([9, 13, 6])
    ctx, tgt = torch.tensor([2, 4, 0]), torch.tensor([4, 5, 0])
    width = 13
    whole = dense_mask(lengths, ctx, tgt, 2, False, width, convention, 3, 1)
    rows = torch.tensor([[0, 5, 8], [2, 9, 12], [1, 3, 5]])
    keys = torch.tensor([[1, 6], [0, 11], [4, 5]])
    block = dense_mask(lengths, ctx, tgt, 2, False, width, convention, 3, 1, rows=rows, keys=keys)
    assert block.shape == (3, 3, 2)
    for s in range(3):
        assert torch.equal(block[s], whole[s][rows[s]][:, keys[s]]), f"sample {s}"


@pytest.mark.parametrize("convention", ["hstu", "peer"])
def test_window_without_contextual_tokens_equals_zero_contextual_tokens(convention: str) -> None:
    lengths, tgt = torch.tensor([9, 13, 4]), torch.tensor([4, 5, 0])
    none = dense_mask(lengths, None, tgt, 2, True, 13, convention, 2, 1)
    zeros = dense_mask(lengths, torch.zeros(3, dtype=torch.int64), tgt, 2, True, 13, convention, 2, 1)
    assert torch.equal(none, zeros)
    assert not torch.equal(none, dense_mask(lengths, None, tgt, 2, True, 13, convention))


def test_window_larger_than_every_sample_is_full_attention() -> None:
    lengths, ctx, tgt = torch.tensor([9, 13]), torch.tensor([2, 4]), torch.tensor([4, 5])
    for convention in ("hstu", "peer"):
        full = dense_mask(lengths, ctx, tgt, 2, True, 13, convention)
        assert torch.equal(dense_mask(lengths, ctx, tgt, 2, True, 13, convention, 13), full)


@pytest.mark.parametrize("window, full, message", [
    (-1, 0, r"^max_attn_len and min_full_attn_seq_len must be >= 0 \(0: off\), got -1 and 0$"),
    (0, 4, r"^min_full_attn_seq_len=4 needs max_attn_len > 0 \(without a window every row already sees the whole history\)$"),
    (0, 1, r"^min_full_attn_seq_len=1 needs max_attn_len > 0"),
])
def test_bad_window_is_one_line(window: int, full: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_window(window, full)


META_FILE = os.environ.get("HSTU_META_GR_FILE", "")


@pytest.mark.skipif(
    not META_FILE,
    reason="set HSTU_META_GR_FILE to generative-recommenders' "
    "generative_recommenders/ops/pytorch/pt_hstu_attention.py to compare with Meta's mask",
)
def test_peer_window_matches_metas_reference_mask() -> None:
    spec = importlib.util.spec_from_file_location("meta_pt_hstu_attention", META_FILE)
    meta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta)
    lengths = torch.tensor([9, 14, 12])
    width = 16
    compared = 0
    # Meta has one contextual count for the batch and no target groups (g = 1)
    for causal, ctx, tgt, window, full in itertools.product(
        [True, False], [0, 1, 3], [0, 1, 4], [0, 1, 2, 5], [0, 1, 3]
    ):
        if full and not window:
            continue
        targets = torch.full((3,), tgt) if tgt else None
        theirs = meta._get_valid_attn_mask(
            torch.device("cpu"), causal, width, lengths, targets, window, ctx, full
        ).expand(3, width, width)
        ours = dense_mask(lengths, torch.full((3,), ctx) if ctx else None, targets, 1, causal,
                          width, "peer", window, full)
        for s, n in enumerate(lengths.tolist()):
            assert torch.equal(ours[s, :n, :n], theirs[s, :n, :n]), (
                causal, ctx, tgt, window, full, s)
            compared += 1
    assert compared == 540
