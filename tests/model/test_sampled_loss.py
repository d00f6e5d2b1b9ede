"""The sampled retrieval losses' edges (hstu/ops/losses/sampled.py): which kernel takes which
shapes, one-sided gradients, the data path's transpose reaching the backward, a catalogue past
int16 ids, the logQ-corrected loss's dtypes, scale and empty ranks, and the expected counts of
a mixed draw. Each against a dense reference built here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hstu.data.negatives import transpose_index
from hstu.ops.losses import sampled
from hstu.ops.losses.sampled import (
    SharedRows,
    corrected_softmax_loss,
    expected_counts,
    fused_sampled_loss_applies,
    sampled_softmax_loss,
    sampled_softmax_loss_shared,
    shared_row_scores,
)


def _rows_case(num_q: int, num_u: int, m: int, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(num_q, d, generator=g, dtype=torch.float64)
    rows = torch.randn(num_u, d, generator=g, dtype=torch.float64)
    index = torch.randint(0, num_u, (num_q, m), generator=g)
    return queries, rows, index, g


# ------------------------------------------------------------------------- which kernel
def test_the_sampled_kernels_take_cpu_float_batches_with_no_more_columns_than_rows():
    q = torch.zeros(3, 8)
    rows = torch.zeros(4, 8)  # U = 4 < D = 8: the bound is on the rows, not the width
    take = sampled._sampled_kernels_apply
    assert take(q, rows, torch.zeros(3, 4, dtype=torch.long))  # M = U
    assert take(q[:1], rows, torch.zeros(1, 1, dtype=torch.long))  # one query, one column
    assert take(q.double(), rows.double(), torch.zeros(3, 2, dtype=torch.long))
    assert not take(q[:0], rows, torch.zeros(0, 2, dtype=torch.long))  # no query
    assert not take(q, rows, torch.zeros(3, 0, dtype=torch.long))  # no column
    assert not take(q, rows, torch.zeros(3, 5, dtype=torch.long))  # M > U
    assert not take(q, rows.double(), torch.zeros(3, 2, dtype=torch.long))
    assert not take(q.half(), rows.half(), torch.zeros(3, 2, dtype=torch.long))
    shared = SharedRows(rows, torch.zeros(3, 2, dtype=torch.long))
    assert fused_sampled_loss_applies(q, shared)
    assert not fused_sampled_loss_applies(q, SharedRows(rows, torch.zeros(3, 5, dtype=torch.long)))
    assert not fused_sampled_loss_applies(q, rows)  # vectors, not shared rows


# -------------------------------------------------------------------- one-sided gradients
@pytest.mark.parametrize("side", ["queries", "rows"])
def test_scores_and_the_fused_loss_give_one_side_its_gradient(side):
    """Only the queries (or only the rows) need a gradient, as when a frozen item table or a
    frozen tower is trained against: the other side gets none, this one the dense
    reference's."""
    queries, rows, index, g = _rows_case(6, 9, 4)
    uniq = torch.arange(1, 10) * 2
    pos_ids = uniq[torch.randint(0, 9, (6,), generator=g)]
    pos_vectors = torch.randn(6, 5, generator=g, dtype=torch.float64)
    learn = queries if side == "queries" else rows
    for fused in (False, True):
        learn.grad = None
        leaf = learn.requires_grad_()
        if fused:
            loss, _ = sampled_softmax_loss_shared(queries, pos_vectors, pos_ids,
                                                  SharedRows(rows, index), uniq, 0.5)
        else:
            loss = (shared_row_scores(queries, rows, index) ** 2).sum()
        loss.backward()
        got = leaf.grad.clone()
        leaf.requires_grad_(False)
        ref_leaf = learn.detach().clone().requires_grad_()
        q_ref, r_ref = (ref_leaf, rows) if side == "queries" else (queries, ref_leaf)
        if fused:
            ref, _, _ = sampled_softmax_loss(q_ref, pos_vectors, pos_ids, r_ref[index],
                                             uniq[index], 0.5)
        else:
            ref = ((q_ref @ r_ref.t()).gather(1, index) ** 2).sum()
        ref.backward()
        torch.testing.assert_close(loss.detach(), ref.detach())
        torch.testing.assert_close(got, ref_leaf.grad)
        other = rows if side == "queries" else queries
        assert other.grad is None


# ------------------------------------------------------------------- the data's transpose
def test_the_data_paths_transpose_reaches_every_backward(monkeypatch):
    """The batch's (order, offsets) of the negatives' index (built by the loader, off the
    step) is what the backward uses: no sort in the step. Through the scores, the loss over
    shared rows and the fused loss."""
    queries, rows, index, g = _rows_case(7, 11, 5)
    order, offsets = (torch.from_numpy(a) for a in transpose_index(index.numpy(), 11))
    seen = []
    real = sampled._transpose_pattern

    def spy(col, m, num_rows, o, off):
        seen.append((o is order, off is offsets))
        return real(col, m, num_rows, o, off)

    monkeypatch.setattr(sampled, "_transpose_pattern", spy)
    uniq = torch.arange(1, 12)
    pos_ids = uniq[torch.randint(0, 11, (7,), generator=g)]
    pos_vectors = torch.randn(7, 5, generator=g, dtype=torch.float64)
    q = queries.clone().requires_grad_()
    r = rows.clone().requires_grad_()
    shared = SharedRows(r, index, order, offsets)
    shared_row_scores(q, r, index, order, offsets).sum().backward()
    sampled_softmax_loss(q, pos_vectors, pos_ids, shared, uniq[index], 0.5)[0].backward()
    sampled_softmax_loss_shared(q, pos_vectors, pos_ids, shared, uniq, 0.5)[0].backward()
    assert seen == [(True, True)] * 3


# ----------------------------------------------------------------- catalogue past int16
def test_row_gradients_past_int16_row_ids():
    """More than 2**15 rows: the transpose sorts 32-bit keys (16-bit ones wrap), with or
    without the last rows drawn."""
    num_u = 40_000
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(num_u, 3, generator=g, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(50, 3, generator=g, dtype=torch.float64)
    index = torch.randint(num_u - 30_000, num_u - 5, (50, 20), generator=g)
    index[0, :3] = torch.tensor([2**15 - 1, 2**15, 2**15 + 1])
    shared_row_scores(queries, rows, index).pow(2).sum().backward()
    ref = rows.detach().clone().requires_grad_()
    (queries @ ref.t()).gather(1, index).pow(2).sum().backward()
    torch.testing.assert_close(rows.grad, ref.grad)


# ----------------------------------------------------------------------- logQ-corrected
def _corrected_reference(q, pos, pos_ids, negs, neg_ids, pos_lq, neg_lq, t, excluded, kept):
    pos_logits = (q * pos).sum(-1) / t - pos_lq
    neg_logits = q @ negs.t() / t - neg_lq
    neg_logits = neg_logits.masked_fill(neg_ids[None] == pos_ids[:, None], float("-inf"))
    neg_logits = neg_logits + excluded
    neg_logits = neg_logits.masked_fill((neg_ids < 0)[None], float("-inf"))
    per_query = torch.logsumexp(torch.cat([pos_logits[:, None], neg_logits], 1), 1) - pos_logits
    return per_query, pos_logits, neg_logits


def test_the_corrected_loss_keeps_the_queries_dtype_and_its_scale():
    """float32 queries with float64 log-probabilities and a float64 exclusion mask: logits
    and loss in float32; a negative of id 0 is an item (only ids < 0 are left out); the
    scale multiplies the kept queries' sum."""
    g = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    pos = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    negs = F.normalize(torch.randn(5, 6, generator=g), dim=1)
    pos_ids = torch.tensor([3, 7, 5, 9])
    neg_ids = torch.tensor([0, 3, -1, 8, 11])
    pos_lq = torch.rand(4, generator=g, dtype=torch.float64).log()
    neg_lq = torch.rand(5, generator=g, dtype=torch.float64).log()
    excluded = torch.zeros(4, 5, dtype=torch.float64)
    excluded[1, 4] = float("-inf")
    kept = torch.tensor([True, True, False, True])
    scale = torch.tensor(0.25)
    loss, pos_logits, neg_logits = corrected_softmax_loss(
        q, pos, pos_ids, negs, neg_ids, pos_lq, neg_lq, 0.1, scale=scale, excluded=excluded,
        kept=kept)
    assert loss.dtype == pos_logits.dtype == neg_logits.dtype == torch.float32
    per_query, want_pos, want_neg = _corrected_reference(
        q.double(), pos.double(), pos_ids, negs.double(), neg_ids, pos_lq, neg_lq, 0.1,
        excluded, kept)
    torch.testing.assert_close(pos_logits.double(), want_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neg_logits.double(), want_neg, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(neg_logits[:, 0]).all()  # id 0 stays
    assert torch.isinf(neg_logits[:, 2]).all() and torch.isinf(neg_logits[1, 4])
    torch.testing.assert_close(loss.double(), per_query[kept].sum() * 0.25, rtol=1e-5, atol=1e-6)


def test_expected_counts_of_a_mixed_draw():
    batch = torch.tensor([4, 2, 4, 9])
    ids = torch.tensor([4, 2, 7, 9])
    got = expected_counts(batch, 6, 3, ids)
    assert got.dtype == torch.float64 and got.tolist() == [4.0, 3.0, 2.0, 3.0]
    assert expected_counts(batch, 6, 1, ids).tolist() == [8.0, 7.0, 6.0, 7.0]  # one item
    assert expected_counts(batch, 6, 0, ids).tolist() == [2.0, 1.0, 0.0, 1.0]  # no uniform part


# --------------------------------------------------------------- groups, kept, empty ranks
def test_two_groups_of_negatives_with_targets_left_out():
    """Shared negatives [M1, D] and per-query ones [Q, M2, D] (uniform and in-batch, as a mixed
    draw gives them), M1 == M2 so that joining them along the wrong dimension would not fail
    by shape alone; one query kept (the mean is its loss alone); negatives of id < 0 (targets
    left out) -inf, of id 0 an item like any other."""
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    pos = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    shared = F.normalize(torch.randn(2, 5, generator=g, dtype=torch.float64), dim=1)
    per_query = F.normalize(torch.randn(3, 2, 5, generator=g, dtype=torch.float64), dim=-1)
    pos_ids = torch.tensor([4, 6, 8])
    shared_ids = torch.tensor([0, 6])  # id 0; a hit for query 1
    query_ids = torch.tensor([[-1, 9], [4, -1], [8, 3]])  # left out; a hit for query 2
    kept = torch.tensor([False, True, False])
    loss, pos_logits, neg_logits = sampled_softmax_loss(
        q, pos, pos_ids, [shared, per_query], [shared_ids, query_ids], 0.5, kept=kept)
    logits = torch.cat([q @ shared.t(), torch.einsum("qd,qmd->qm", q, per_query)], 1) / 0.5
    ids = torch.cat([shared_ids.expand(3, -1), query_ids], 1)
    logits = logits.masked_fill((ids == pos_ids[:, None]) | (ids < 0), float("-inf"))
    assert neg_logits.shape == (3, 4)
    torch.testing.assert_close(neg_logits, logits)
    assert torch.isfinite(neg_logits[:, 0]).all()  # id 0 stays
    full = torch.cat([((q * pos).sum(1) / 0.5)[:, None], logits], 1)
    want = -torch.log_softmax(full, 1)[1, 0]
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(pos_logits, (q * pos).sum(1) / 0.5)


@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("num_q", [0, 1])
def test_an_empty_rank_is_a_zero_loss_and_one_query_its_loss(num_q, corrected):
    """Both sampled losses (plain and logQ-corrected, log q = 0 here): no query is a zero loss
    whose backward still reaches the negatives (every rank runs the same backward); one query
    is that query's loss, not a shortcut's zero."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(num_q, 4, generator=g, requires_grad=True)
    negs = torch.randn(3, 4, generator=g, requires_grad=True)
    pos = torch.randn(num_q, 4, generator=g)
    pos_ids, neg_ids = torch.arange(num_q) + 10, torch.arange(3)
    if corrected:
        loss, _, _ = corrected_softmax_loss(q, pos, pos_ids, negs, neg_ids, torch.zeros(num_q),
                                            torch.zeros(3), 1.0)
    else:
        loss, _, _ = sampled_softmax_loss(q, pos, pos_ids, negs, neg_ids, 1.0)
    loss.backward()
    assert negs.grad is not None
    if num_q == 0:
        assert float(loss.detach()) == 0.0 and not negs.grad.any()
    else:
        want = torch.logsumexp(torch.cat([(q * pos).sum(1), (q @ negs.t())[0]]), 0) - (q * pos).sum()
        torch.testing.assert_close(loss.detach(), want.detach())
