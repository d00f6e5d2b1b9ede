import pytest
import torch

from hstu.ops import dense_mask

from .reference import naive_mask

# Sample of 8 tokens: 2 contextual, 3 history, 3 candidates in groups of 2 ([5, 6], [7]).
# Rows are queries i, columns keys j; written out by hand from docs/kernels.md.
HAND_BUILT_CAUSAL = [
    # 0  1  2  3  4  5  6  7
    [1, 1, 0, 0, 0, 0, 0, 0],  # 0 ctx: whole contextual block
    [1, 1, 0, 0, 0, 0, 0, 0],  # 1 ctx
    [1, 1, 1, 0, 0, 0, 0, 0],  # 2 history: causal
    [1, 1, 1, 1, 0, 0, 0, 0],  # 3
    [1, 1, 1, 1, 1, 0, 0, 0],  # 4
    [1, 1, 1, 1, 1, 1, 0, 0],  # 5 candidate, group 0
    [1, 1, 1, 1, 1, 1, 1, 0],  # 6 candidate, group 0: sees 5
    [1, 1, 1, 1, 1, 0, 0, 1],  # 7 candidate, group 1: not 5, 6
]
HAND_BUILT_NON_CAUSAL = [
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 0],
    [1, 1, 1, 1, 1, 0, 0, 1],
]


@pytest.mark.parametrize(
    "causal, expected", [(True, HAND_BUILT_CAUSAL), (False, HAND_BUILT_NON_CAUSAL)]
)
def test_hand_built_mask(causal: bool, expected: list[list[int]]) -> None:
    want = torch.tensor(expected, dtype=torch.bool)
    assert torch.equal(naive_mask(8, 2, 3, 2, causal), want)
    got = dense_mask(torch.tensor([8]), torch.tensor([2]), torch.tensor([3]), 2, causal, 8)[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 3])
def test_dense_mask_matches_rule_on_padded_group(causal: bool, group: int) -> None:
    lengths = torch.tensor([9, 1, 13, 6])
    ctx = torch.tensor([2, 0, 4, 0])
    tgt = torch.tensor([4, 1, 5, 0])
    width = 15
    got = dense_mask(lengths, ctx, tgt, group, causal, width)
    for s in range(len(lengths)):
        n = int(lengths[s])
        want = torch.zeros(width, width, dtype=torch.bool)
        want[:n, :n] = naive_mask(n, int(ctx[s]), int(tgt[s]), group, causal)
        assert torch.equal(got[s], want), f"sample {s}"


def test_dense_mask_without_context_or_targets_is_causal() -> None:
    got = dense_mask(torch.tensor([5]), None, None, 1, True, 5)[0]
    assert torch.equal(got, torch.ones(5, 5, dtype=torch.bool).tril())
