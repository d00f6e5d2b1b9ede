"""Uniform negatives: each distinct id is looked up once, and the shared-rows score path gives
the same loss and gradients as gathering [Q, M, D] vectors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hstu.data.negatives import transpose_index
from hstu.ops.losses import SharedRows, negative_vectors, sampled_softmax_loss


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(20, 8, generator=g, requires_grad=True)
    queries = torch.randn(6, 8, generator=g, requires_grad=True)
    pos_ids = torch.randint(1, 20, (6,), generator=g)
    neg_ids = torch.randint(1, 20, (6, 32), generator=g)
    neg_ids[0, 3] = pos_ids[0]  # an accidental hit
    return table, queries, pos_ids, neg_ids


def _loss(shared: bool):
    table, queries, pos_ids, neg_ids = _inputs()
    q = F.normalize(queries, dim=-1)
    pos = F.normalize(table[pos_ids], dim=-1)
    if shared:
        uniq, inverse = torch.unique(neg_ids.reshape(-1), return_inverse=True)
        neg = SharedRows(F.normalize(table[uniq], dim=-1), inverse.view(neg_ids.shape))
    else:
        neg = F.normalize(table[neg_ids], dim=-1)
    loss, _pos_logits, neg_logits = sampled_softmax_loss(q, pos, pos_ids, neg, neg_ids, 0.05)
    loss.backward()
    return loss, neg_logits, table.grad, queries.grad


def test_shared_rows_equal_gathered_negatives():
    l1, n1, gt1, gq1 = _loss(shared=False)
    l2, n2, gt2, gq2 = _loss(shared=True)
    torch.testing.assert_close(l1, l2)
    assert torch.isneginf(n2[0, 3]) and torch.isneginf(n1[0, 3])
    torch.testing.assert_close(n1, n2)
    torch.testing.assert_close(gt1, gt2)
    torch.testing.assert_close(gq1, gq2)


def test_model_negative_vectors_match_per_id_lookup():
    from tests.model.test_models import _retrieval

    model = _retrieval(num_negatives=5, use_collection=True)
    g = torch.Generator().manual_seed(3)
    for m in (5, 400, 40):  # few negatives: gathered [Q, M, D]; many: shared rows
        neg_ids = torch.randint(1, 30, (4, m), generator=g)
        uniq, index = torch.unique(neg_ids, return_inverse=True)
        rows = model.normalise(model.lookup_items(uniq))
        got = negative_vectors(rows, index)
        want = model.normalise(model.lookup_items(neg_ids.reshape(-1))).view(4, m, -1)
        if isinstance(got, SharedRows):
            got = got.rows[got.index]
        else:
            assert m != 400
        torch.testing.assert_close(got, want)


def test_negative_vectors_off_the_cpu_share_rows_only_when_smaller():
    """On a device (meta tensors stand in: only shapes are read), rows are shared while the
    [U, D] rows and their [Q, M] index weigh no more than the gathered [Q, M, D] vectors
    (2 U <= M D), gathered otherwise; on the CPU always shared, with the transpose kept."""
    q, m, d = 3, 4, 4
    index = torch.zeros(q, m, dtype=torch.int64, device="meta")
    for u, shared in ((8, True), (9, False), (1, True)):
        rows = torch.empty(u, d, device="meta")
        got = negative_vectors(rows, index)
        assert isinstance(got, SharedRows) == shared, u
        if not shared:
            assert got.shape == (q, m, d) and got.device.type == "meta"
    order, offsets = torch.zeros(2, q * m, dtype=torch.int64), torch.zeros(10, dtype=torch.int64)
    got = negative_vectors(torch.zeros(9, d), torch.zeros(q, m, dtype=torch.int64), order, offsets)
    assert isinstance(got, SharedRows) and got.order is order and got.offsets is offsets
    assert got.rows.shape == (9, d) and got.index.shape == (q, m)


def test_shared_row_scores_sparse_kernels_match_dense_gather():
    from hstu.ops.losses import shared_row_scores

    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        for num_q, num_u, m, d in ((7, 3, 9, 4), (50, 300, 16, 8), (1, 1, 1, 1)):
            q = torch.randn(num_q, d, generator=g, dtype=dtype, requires_grad=True)
            rows = torch.randn(num_u, d, generator=g, dtype=dtype, requires_grad=True)
            index = torch.randint(0, num_u, (num_q, m), generator=g)  # duplicates included
            weights = torch.randn(num_q, m, generator=g, dtype=dtype)
            got = shared_row_scores(q, rows, index)
            (got * weights).sum().backward()
            gq, gr = q.grad.clone(), rows.grad.clone()
            q.grad = rows.grad = None
            # the same with the transpose built in the data path: bitwise the same grads
            order, offsets = (torch.from_numpy(a) for a in transpose_index(index.numpy(), num_u))
            got_t = shared_row_scores(q, rows, index, order, offsets)
            (got_t * weights).sum().backward()
            assert torch.equal(got_t, got)
            assert torch.equal(q.grad, gq) and torch.equal(rows.grad, gr)
            q.grad = rows.grad = None
            want = (q @ rows.t()).gather(1, index)
            (want * weights).sum().backward()
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(gq, q.grad)
            torch.testing.assert_close(gr, rows.grad)


def test_transpose_index_is_the_stable_column_order():
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 40, (30, 7), generator=g).numpy()
    index[:, 0] = 5  # a long run of one value: its positions must stay ascending
    order, offsets = transpose_index(index, 45)  # rows 40-44 unused: empty runs
    flat = index.reshape(-1)
    want = sorted(range(flat.size), key=lambda p: (flat[p], p))
    assert order[0].tolist() == want
    assert order[1].tolist() == [p // 7 for p in want]
    assert offsets.tolist() == [0] + np.cumsum(np.bincount(flat, minlength=45)).tolist()
    assert transpose_index(index, 2**15 + 1) == (None, None)  # wide keys: sorted in the step
    wide, _ = transpose_index(index, 2**15)  # the widest that 16-bit keys still sort here
    assert wide.tolist() == order.tolist()
    # a sampler told not to ship it (the trainer on GPUs) carries the index alone
    from hstu.data.negatives import NegativeSampler

    fields = NegativeSampler("uniform", 7, 1, 41, "item", 0, transpose=False).batch_fields(index, 45)
    assert fields["negative_order"] is None and fields["negative_offsets"] is None
    assert torch.equal(fields["negative_index"], torch.from_numpy(index))


def test_transpose_index_power_of_two_width_gives_the_same_queries():
    # M a power of two takes a shift instead of a division for the query of each entry
    g = torch.Generator().manual_seed(4)
    index = torch.randint(0, 50, (33, 8), generator=g).numpy()
    order, _ = transpose_index(index, 50)
    flat = index.reshape(-1)
    want = sorted(range(flat.size), key=lambda p: (flat[p], p))
    assert order[0].tolist() == want
    assert order[1].tolist() == [p // 8 for p in want]


def test_transpose_index_of_one_negative_per_query():
    # M = 1: each entry is its own query (no shift by one, no division by two)
    index = np.array([[3], [0], [3], [1], [0]])
    order, offsets = transpose_index(index, 4)
    assert order.tolist() == [[1, 4, 3, 0, 2], [1, 4, 3, 0, 2]]
    assert offsets.tolist() == [0, 2, 3, 3, 5]


def test_the_full_corpus_is_never_drawn_into_a_batch():
    from hstu.data.negatives import NegativeSampler

    with pytest.raises(ValueError) as err:
        NegativeSampler("full_corpus", 0, 1, 10, "item", 0)
    assert str(err.value) == (
        "NegativeSampler: the full corpus is never drawn into a batch (its loss reads each "
        "rank's item table rows: hstu.ops.losses.vocab_parallel)")


_M64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def test_uniform_draw_is_the_documented_hash():
    """Each negative is splitmix64(key(seed, epoch, sample, position) ^ slot * c) % span, written
    here in Python integers; the sampler computes it on uint64 blocks of queries in place, so a
    block boundary, an in-place pass or the division trick that is off breaks the equality."""
    from hstu.data.negatives import _BLOCK, NegativeSampler

    seed, epoch, m, lo, hi = 77, 3, 6, 1, 1001
    sampler = NegativeSampler("uniform", m, lo, hi, "item", seed)
    sample_ids = np.array([5, 0, 123456789, 42])
    lengths = np.array([4, 0, 3, 2 * (_BLOCK // m) + 5])  # the last sample spans three blocks
    uniq, index = sampler.draw(sample_ids, lengths, epoch)
    want = []
    base = _splitmix(((seed & 0xFFFFFFFF) * 1_000_003 + epoch) & _M64)
    for sid, length in zip(sample_ids.tolist(), lengths.tolist()):
        for pos in range(max(length - 1, 0)):
            key = _splitmix(_splitmix(base ^ sid) ^ ((pos * 0x100000001B3) & _M64))
            want.append([
                _splitmix(key ^ ((s * 0xD6E8FEB86659FD93) & _M64)) % (hi - lo) + lo for s in range(m)
            ])
    want = np.array(want)
    assert index.shape == want.shape
    np.testing.assert_array_equal(uniq[index], want)
    np.testing.assert_array_equal(uniq, np.unique(want))


def test_draw_counts_are_the_transpose_row_lengths():
    """The draw's per-id counts (kept from finding the distinct ids) are what the transpose's
    offsets need; with them the transpose equals the one that counts by itself."""
    from hstu.data.negatives import NegativeSampler

    sampler = NegativeSampler("uniform", 16, 1, 60, "item", 9)
    uniq, index, counts = sampler.draw_counted(np.array([3, 8, 1]), np.array([7, 1, 12]), 2)
    want_uniq, want_index = sampler.draw(np.array([3, 8, 1]), np.array([7, 1, 12]), 2)
    assert np.array_equal(uniq, want_uniq) and np.array_equal(index, want_index)
    assert counts.tolist() == np.bincount(index.reshape(-1), minlength=uniq.size).tolist()
    assert counts.min() > 0  # every distinct id was drawn at least once
    with_counts = transpose_index(index, uniq.size, counts)
    alone = transpose_index(index, uniq.size)
    assert all(np.array_equal(a, b) for a, b in zip(with_counts, alone))
    assert sampler.draw_counted(np.array([3]), np.array([1]), 0)[2].size == 0  # no queries, no ids
    # the full corpus is never drawn into a batch (its loss reads each rank's table rows)
    with pytest.raises(ValueError, match="full corpus is never drawn"):
        NegativeSampler("full_corpus", -1, 1, 60, "item", 9)


def _spy_catalogue_work(monkeypatch, num_items):
    """Records every numpy call of the data path that builds an array of num_items entries."""
    from hstu.data import negatives

    calls = []
    for name in ("bincount", "arange", "zeros", "ones", "empty", "full"):
        real = getattr(np, name)

        def spy(*a, _real=real, _name=name, **k):
            out = _real(*a, **k)
            if getattr(out, "size", 0) >= num_items:
                calls.append(_name)
            return out

        monkeypatch.setattr(negatives.np, name, spy)
    return calls


def test_draws_never_touch_the_catalogue(monkeypatch):
    """A draw's cost is O(batch) whatever the catalogue: neither the per-query nor the shared
    draw builds an array of the catalogue's size, also where the draw is nearly as large as
    the catalogue (KuaiRand-1K: 4.2M draws, 4.37M items, where a dense count used to run; a
    draw at least as large counts: the next test). The arrays are the ones a dense count
    gives."""
    from hstu.data.negatives import NegativeSampler

    sample_ids, lengths = np.array([3, 8, 1]), np.array([7, 1, 12])
    num_items = 300  # 17 queries x 16 = 272 draws
    calls = _spy_catalogue_work(monkeypatch, num_items)
    ids, index, counts = NegativeSampler("uniform", 16, 1, num_items, "item", 9).draw_counted(
        sample_ids, lengths, 2)
    shared = NegativeSampler("shared", 64, 1, num_items, "item", 9).draw(sample_ids, lengths, 2)
    assert calls == []
    monkeypatch.undo()
    drawn = ids[index]
    dense = np.bincount(drawn.reshape(-1), minlength=num_items)
    assert np.array_equal(ids, np.flatnonzero(dense)) and np.array_equal(counts, dense[ids])
    assert drawn.min() >= 1 and drawn.max() < num_items
    assert shared[1] is None and 1 < shared[0].size <= 64 and np.all(np.diff(shared[0]) > 0)


def test_shared_draw_is_one_set_per_batch_independent_of_order():
    """The shared draw depends on the batch's set of samples (not their order, not the history
    lengths), changes with the epoch, the seed and the set, and covers the id range."""
    from hstu.data.negatives import NegativeSampler

    s = NegativeSampler("shared", 4000, 1, 1000, "item", 9)
    a, _ = s.draw(np.array([3, 8, 1]), np.array([7, 1, 12]), 0)
    assert np.array_equal(a, s.draw(np.array([1, 3, 8]), np.array([2, 2, 2]), 0)[0])
    for other in (s.draw(np.array([3, 8, 2]), np.array([7, 1, 12]), 0)[0],
                  s.draw(np.array([3, 8, 1]), np.array([7, 1, 12]), 1)[0],
                  NegativeSampler("shared", 4000, 1, 1000, "item", 10).draw(
                      np.array([3, 8, 1]), np.array([7, 1, 12]), 0)[0]):
        assert not np.array_equal(a, other)
    # 4000 uniform draws over 999 ids: about 98% of them, never 0
    assert a.min() >= 1 and a.max() == 999 and a.size > 950


def test_draw_larger_than_the_catalogue_counts_instead_of_sorting(monkeypatch):
    """Where the draw holds at least as many ids as the catalogue (ML-100K: 1.6M draws of
    1,682 ids), the distinct ids come from a count over the catalogue, not a sort of the draw
    (the sort made the data thread 2.3x slower: 89 against 38 ms a batch of the ML-1M recipe
    on ML-100K, measured with scripts/ab_commits.py);
    the arrays equal a plain sort's, on either side of the threshold."""
    from hstu.data import negatives
    from hstu.data.negatives import NegativeSampler

    sample_ids, lengths = np.array([3, 8, 1]), np.array([7, 1, 12])  # 17 queries
    sorts = []
    real_unique = np.unique

    def spy(*a, **k):
        sorts.append(a[0].size)
        return real_unique(*a, **k)

    monkeypatch.setattr(negatives.np, "unique", spy)
    for num_items, m, sorted_ in ((40, 16, False), (273, 16, False), (274, 16, True),
                                  (5000, 4, True)):
        sorts.clear()
        ids, index, counts = NegativeSampler("uniform", m, 1, num_items, "item", 9).draw_counted(
            sample_ids, lengths, 2)
        assert bool(sorts) == sorted_, (num_items, m)
        drawn = ids[index]
        ref_ids, ref_inverse, ref_counts = real_unique(
            drawn.reshape(-1), return_inverse=True, return_counts=True)
        assert np.array_equal(ids, ref_ids) and np.array_equal(counts, ref_counts)
        assert np.array_equal(index.reshape(-1), ref_inverse.reshape(-1))
        assert index.dtype == np.int64 and ids.dtype == np.int64 and counts.dtype == np.int64
        assert drawn.min() >= 1 and drawn.max() < num_items


def test_shared_draw_is_the_documented_hash():
    """Shared draws: key = splitmix64(epoch key ^ xor of splitmix64(sample ^ epoch key) over the
    batch ^ batch size * c1), then splitmix64(slot * c2 ^ key) % span, in Python integers."""
    from hstu.data.negatives import NegativeSampler

    seed, epoch, m, lo, hi = 5, 2, 40, 3, 503
    sample_ids = np.array([17, 4, 99, 123456])
    got = NegativeSampler("shared", m, lo, hi, "item", seed).draw_shared(sample_ids, epoch)
    base = _splitmix(((seed & 0xFFFFFFFF) * 1_000_003 + epoch) & _M64)
    members = 0
    for sid in sample_ids.tolist():
        members ^= _splitmix(sid ^ base)
    key = _splitmix(base ^ members ^ ((len(sample_ids) * 0x100000001B3) & _M64))
    want = sorted({_splitmix(((s * 0xD6E8FEB86659FD93) & _M64) ^ key) % (hi - lo) + lo
                   for s in range(m)})
    assert got.dtype == np.int64
    assert got.tolist() == want


def test_attach_negatives_appends_one_key_in_sample_zeros_slot():
    """Training: the drawn ids as one more key of the item table's batch (all in sample 0's
    slot), the index and its transpose as the draw gives them; evaluation: the key empty."""
    from hstu.data.negatives import transpose_index

    from .helpers import make_batch, sampler

    history = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    s = sampler("uniform", num_negatives=4, num_items=30)
    batch = make_batch(history, negatives=s, training=True)
    uniq, index, counts = s.draw_counted(np.arange(3), np.array([4, 2, 3]), 0)
    kjt = batch.features
    assert kjt.keys() == ["item", s.feature_name] and kjt.stride() == 3
    # counted on the host with the batch (a step reading them from the lengths would sync)
    assert kjt.length_per_key_or_none() == [9, uniq.size]
    assert kjt.offset_per_key_or_none() == [0, 9, 9 + uniq.size]
    neg = kjt[s.feature_name]
    assert neg.values().dtype == torch.int64
    assert neg.values().tolist() == uniq.tolist()
    assert neg.lengths().tolist() == [uniq.size, 0, 0]
    assert kjt["item"].values().tolist() == [v for h in history for v in h]  # items unchanged
    assert torch.equal(batch.negative_index, torch.from_numpy(index))
    order, offsets = transpose_index(index, uniq.size)
    assert torch.equal(batch.negative_order, torch.from_numpy(order))
    assert torch.equal(batch.negative_offsets, torch.from_numpy(offsets))
    assert counts.sum() == index.size

    evaluation = make_batch(history, negatives=s, training=False)
    ekjt = evaluation.features
    assert ekjt.keys() == ["item", s.feature_name]
    assert ekjt[s.feature_name].values().numel() == 0
    assert ekjt[s.feature_name].values().dtype == torch.int64
    assert ekjt[s.feature_name].lengths().tolist() == [0, 0, 0]
    assert evaluation.negative_index is None and evaluation.negative_order is None
    assert evaluation.negative_offsets is None


def test_distinct_by_counting_equals_distinct_by_sorting():
    """_distinct counts over the span when it is no larger than the draw, else sorts the
    draw: the same ids, ranks (in the draw's shape) and counts either way, as np.unique."""
    from hstu.data.negatives import _distinct

    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, size=(7, 9)).astype(np.int64)  # 63 draws, ids below 50
    for span in (50, 64, 1000):  # 50, 64: counted (span <= 63 draws); 1000: sorted
        uniq, ranks, counts = _distinct(ids, 5, span)
        want, inverse, want_counts = np.unique(ids, return_inverse=True, return_counts=True)
        assert uniq.dtype == ranks.dtype == counts.dtype == np.int64
        assert uniq.tolist() == (want + 5).tolist()
        assert ranks.shape == ids.shape
        assert ranks.tolist() == inverse.reshape(ids.shape).tolist()
        assert counts.tolist() == want_counts.tolist()


def test_live_draws_nothing_in_the_data_path():
    from hstu.data.negatives import NegativeSampler

    ids, index, counts = NegativeSampler("live", 8, 1, 100, "item", 0).draw_counted(
        np.arange(3), np.array([4, 2, 3]), 0)
    assert ids.dtype == np.int64 and ids.shape == (0,)
    assert index is None and counts is None
