import pytest
import torch

from hstu.ops import dense_mask

from .reference import naive_mask

# The hand-written masks of both conventions: tests/ops/test_mask_conventions.py.


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


@pytest.mark.parametrize("field, value, message", [
    ("target_group_size", 0, "target_group_size must be >= 1, got 0"),
    ("scaling_seqlen", 0, "scaling_seqlen must be > 0, got 0"),
    ("scaling_seqlen", -3, "scaling_seqlen must be > 0, got -3"),
])
def test_attention_options_refuse_bad_values_in_one_line(field, value, message) -> None:
    from hstu.ops.masks import AttentionOptions

    with pytest.raises(ValueError, match=message):
        AttentionOptions(**{"alpha": 1.0, "scaling_seqlen": 8, field: value})


def test_attention_options_smallest_valid_values() -> None:
    from hstu.ops.masks import AttentionOptions

    opts = AttentionOptions(alpha=1.0, scaling_seqlen=1, target_group_size=1)
    assert (opts.scaling_seqlen, opts.target_group_size) == (1, 1)
