"""hstu.ops.softmax_attention (SASRec's jagged attention): each sample's output against
softmax attention over that sample alone (no padding, no chunk), and the chunk plan's
invariants."""

from __future__ import annotations

import math

import pytest
import torch

from hstu.ops.softmax_attention import causal_softmax_attention, plan_causal_chunks

LENGTHS = [0, 40, 1, 2, 17, 0, 33, 8, 5, 21, 3, 12, 39, 1, 26, 7, 64]


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths).cumsum(0)])


def _one_sample(qkv: torch.Tensor) -> torch.Tensor:
    """qkv [n, 3, H, d] of one sample -> [n, H, d], the causal softmax attention written out."""
    q, k, v = qkv.unbind(1)  # [n, H, d]
    n = q.shape[0]
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(q.shape[-1])
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", weights, v)


@pytest.mark.parametrize("budget", [512 * 2**20, 64 * 2**10])  # the default; the long ones alone
def test_each_sample_equals_attention_over_that_sample_alone(budget: int) -> None:
    """Chunks of several samples (the default budget), or the longer samples one per chunk (a
    small one): each sample's output is its own attention, within float32 rounding (rtol =
    atol = 1e-5)."""
    torch.manual_seed(0)
    offsets = _offsets(LENGTHS)
    qkv = torch.randn(int(offsets[-1]), 3, 2, 8)
    plan = plan_causal_chunks(offsets, num_heads=2, memory_budget_bytes=budget)
    if budget < 2**20:
        assert sum(c.num_samples == 1 for c in plan.chunks) >= 3, [c.num_samples for c in plan.chunks]
    got = causal_softmax_attention(qkv, plan)
    want = torch.cat([_one_sample(qkv[s:e]) for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_plan_covers_each_token_once_and_pads_a_chunk_at_most_twofold() -> None:
    offsets = _offsets(LENGTHS)
    plan = plan_causal_chunks(offsets, num_heads=1)
    rows = []
    for c in plan.chunks:
        gathered = c.gather.view(c.num_samples, c.width)
        real = c.gather[c.valid]
        rows.append(real)
        # each row of the chunk is one sample's tokens, in order, its padding after them
        lengths = torch.bincount(c.valid // c.width, minlength=c.num_samples)
        assert (lengths > c.width / 2).all() and int(lengths.max()) == c.width
        for r, n in enumerate(lengths.tolist()):
            assert torch.equal(gathered[r, :n], gathered[r, 0] + torch.arange(n))
            assert torch.equal(c.valid[c.valid // c.width == r], r * c.width + torch.arange(n))
    rows = torch.cat(rows)
    assert torch.equal(rows.sort().values, torch.arange(int(offsets[-1])))
    assert torch.equal(rows[plan.order], torch.arange(int(offsets[-1])))
    assert len(plan.chunks) < len([n for n in LENGTHS if n > 0])


def test_a_batch_without_tokens() -> None:
    offsets = _offsets([0, 0])
    out = causal_softmax_attention(torch.zeros(0, 3, 2, 8), plan_causal_chunks(offsets, 2))
    assert out.shape == (0, 2, 8)


def test_dropout_reaches_the_attention_weights() -> None:
    torch.manual_seed(0)
    offsets = _offsets([6, 3])
    qkv = torch.randn(9, 3, 1, 4)
    plan = plan_causal_chunks(offsets, 1)
    assert not torch.allclose(causal_softmax_attention(qkv, plan, 0.5), causal_softmax_attention(qkv, plan))
