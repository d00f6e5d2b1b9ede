"""RetrievalArgs.exclude_history_from_loss: the history window (hstu.ops.losses.HistoryWindow)
leaves out exactly the (query, item) pairs that the earlier list of pairs did, whatever the
repeats in a history and wherever the target sits in it; the model's loss and gradients equal
the earlier implementation's (its pair builder kept here as the reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hstu.ops.jagged import index_within, lengths_to_offsets, segment_ids
from hstu.ops.losses import HistoryWindow
from tests.model.helpers import make_batch
from tests.model.test_models import _retrieval


def old_history_pairs(q_seg, q_idx, item_starts, item_ids, pos_ids):
    """The implementation this window replaced (hstu/model/retrieval.py before issue 39): (query
    rows, item ids) of every query's items 0..j except its target; sum(H^2) / 2 entries."""
    num_q = q_seg.numel()
    per_query = q_idx + 1
    rows = torch.repeat_interleave(torch.arange(num_q), per_query)
    starts = torch.cumsum(per_query, 0) - per_query
    within = torch.arange(rows.numel()) - starts[rows]
    items = item_ids[item_starts[q_seg[rows]] + within]
    keep = items != pos_ids[rows]
    return rows[keep], items[keep]


def _queries_of(histories: list[list[int]]):
    """(q_seg, q_idx, item_starts, item_ids, pos_ids) as the model lays out its queries."""
    hist = torch.tensor([len(h) for h in histories])
    has_next = (hist - 1).clamp(min=0)
    num_q = int(has_next.sum())
    q_seg, q_idx = segment_ids(has_next, num_q), index_within(has_next, num_q)
    item_starts = lengths_to_offsets(hist)[:-1]
    item_ids = torch.tensor([i for h in histories for i in h])
    return q_seg, q_idx, item_starts, item_ids, item_ids[item_starts[q_seg] + q_idx + 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("window_elements", [3, 1 << 16])
def test_window_masks_the_pairs_the_pair_list_masked(monkeypatch, seed, window_elements):
    from hstu.ops.losses import full_corpus

    monkeypatch.setattr(full_corpus, "_WINDOW_ELEMENTS", window_elements)
    g = torch.Generator().manual_seed(seed)
    num_items, min_id = 12, 1
    # histories drawn from few ids: repeats, and targets that sit earlier in their history
    histories = [
        torch.randint(min_id, num_items, (int(n),), generator=g).tolist()
        for n in torch.randint(0, 30, (6,), generator=g)
    ]
    q_seg, q_idx, item_starts, item_ids, pos_ids = _queries_of(histories)
    logits = torch.randn(q_seg.numel(), num_items - min_id, generator=g)
    rows, items = old_history_pairs(q_seg, q_idx, item_starts, item_ids, pos_ids)
    old = logits.index_put((rows, items - min_id), torch.tensor(float("-inf")))
    new = logits.clone()
    window = HistoryWindow(item_ids, item_starts[q_seg], q_idx + 1, max(map(len, histories)) - 1)
    # blocks of 4 queries, as the fused loss applies it
    for s in range(0, new.shape[0], 4):
        window.shifted(min_id).mask_(new[s : s + 4], s, pos_ids[s : s + 4] - min_id)
    assert torch.isneginf(old).any() and (pos_ids.unsqueeze(1) == item_ids[item_starts[q_seg]].unsqueeze(1)).any()
    assert torch.equal(new, old)  # bitwise: the same entries at -inf, every other unchanged


def test_model_loss_and_gradients_equal_the_pair_list_reference():
    """Through build_model: a batch whose histories repeat items and return to them (the targets
    of queries 1 and 3 of sample 0 are among its earlier items); the loss and every dense gradient equal a
    cross-entropy with the old pairs' entries at -inf, built by hand."""
    batch = make_batch([[3, 5, 3, 7, 5, 9], [2, 2, 4], [8]])
    model = _retrieval(-1, sampling="full_corpus", exclude_history_from_loss=True).train()
    dense = model.dense_module
    loss, _ = model(batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in dense.named_parameters() if p.grad is not None}
    model.zero_grad()

    # the reference: the same forward by hand, the old pairs' entries at -inf
    embeddings = model.sparse(batch.features)
    _own, _inputs, _layout, tokens, states = dense._states(batch, embeddings)
    queries = dense.normalise(states[tokens.history_query_rows])[[0, 1, 2, 3, 4, 6, 7]]
    corpus = dense.normalise(model.lookup_items(torch.arange(1, 30)))  # ids 1..29
    q_seg, q_idx, item_starts, item_ids, pos_ids = _queries_of([[3, 5, 3, 7, 5, 9], [2, 2, 4], [8]])
    rows, items = old_history_pairs(q_seg, q_idx, item_starts, item_ids, pos_ids)
    pairs = set(zip(rows.tolist(), items.tolist()))
    # query 1's target 3 and query 3's target 5 sit earlier in their histories: kept
    assert (1, 3) not in pairs and (3, 5) not in pairs and (0, 3) in pairs and (2, 5) in pairs
    logits = (queries @ corpus.t() / 0.1).index_put((rows, items - 1), torch.tensor(float("-inf")))
    want = F.cross_entropy(logits, pos_ids - 1)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    for name, p in dense.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert len(got) > 3 and any(float(g.abs().sum()) > 0 for g in got.values())
