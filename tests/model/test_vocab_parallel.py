"""The vocabulary-parallel full-corpus loss (hstu.ops.losses.vocab_parallel): 2 processes, each
holding its own queries and one uneven shard of the corpus, give the loss and the gradients
(queries, corpus rows) of one process holding everything, with and without the history
exclusion."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hstu.ops.losses import HistoryWindow, full_corpus_loss
from tests.dist_utils import run_multiprocess

NUM_ITEMS, MIN_ID, D, T = 23, 1, 6, 0.1


def _world_case(seed: int = 0):
    """Two ranks' samples (histories of item ids in [1, 23), many repeats) and the corpus."""
    g = torch.Generator().manual_seed(seed)
    samples = [[7, 5], [3, 9, 4]]  # per rank: history lengths
    ids = {r: [torch.randint(MIN_ID, 9, (h,), generator=g) for h in hs] for r, hs in enumerate(samples)}
    corpus = F.normalize(torch.randn(NUM_ITEMS - MIN_ID, D, generator=g), dim=1)
    queries = {r: F.normalize(torch.randn(sum(h - 1 for h in hs), D, generator=g), dim=1)
               for r, hs in enumerate(samples)}
    return ids, corpus, queries


def _rank_inputs(ids: list[torch.Tensor], queries: torch.Tensor):
    """(queries, targets, window) of one rank, as the model lays them out."""
    item_ids = torch.cat(ids)
    starts, lengths, pos = [], [], []
    offset = 0
    for h in ids:
        for j in range(len(h) - 1):
            starts.append(offset)
            lengths.append(j + 1)
            pos.append(int(h[j + 1]))
        offset += len(h)
    width = 8  # the longest history of the world (9 items) - 1, as the dataset's on every rank
    return queries, torch.tensor(pos), HistoryWindow(item_ids, torch.tensor(starts), torch.tensor(lengths), width)


def _reference(exclude: bool):
    """One process: every query, the whole corpus (the mean over the world's queries)."""
    ids, corpus, queries = _world_case()
    parts = [_rank_inputs(ids[r], queries[r]) for r in (0, 1)]
    q = torch.cat([p[0] for p in parts]).requires_grad_()
    c = corpus.clone().requires_grad_()
    pos = torch.cat([p[1] for p in parts])
    window = None
    if exclude:
        shift = parts[0][2].ids.numel()
        window = HistoryWindow(
            torch.cat([parts[0][2].ids, parts[1][2].ids]),
            torch.cat([parts[0][2].starts, parts[1][2].starts + shift]),
            torch.cat([parts[0][2].lengths, parts[1][2].lengths]),
            max(parts[0][2].width, parts[1][2].width),
        )
    loss, (pos_logits, _) = full_corpus_loss(
        q, pos, c, temperature=T, min_item_id=MIN_ID, matmul_dtype=None, training=True, masked=window,
    )
    loss.backward()
    return loss.detach(), pos_logits, q.grad, c.grad


def _two_ranks(rank: int, world_size: int, exclude: bool, want) -> None:
    from hstu.model.loss_scale import PendingScale
    from hstu.ops.gather import PendingCounts
    from hstu.ops.losses.vocab_parallel import vocab_parallel_loss

    ids, corpus, queries = _world_case()
    q, pos, window = _rank_inputs(ids[rank], queries[rank])
    q = q.clone().requires_grad_()
    # uneven contiguous shards of the 22 corpus rows: 9 and 13 (item ids 1..9, 10..22)
    lo, hi = (0, 9) if rank == 0 else (9, 22)
    shard = corpus[lo:hi].clone().requires_grad_()
    counts = PendingCounts(q.shape[0]).wait()
    id_counts = PendingCounts(window.ids.numel()).wait()
    scale = PendingScale(torch.tensor(q.shape[0]), True).wait()
    loss, pos_logits = vocab_parallel_loss(
        q, pos, shard, MIN_ID + lo, counts=counts, temperature=T, scale=scale,
        window=window if exclude else None, id_counts=id_counts, corpus_grad_factor=1 / world_size,
    )
    loss.backward()
    want_loss, want_pos, want_gq, want_gc = want
    total = loss.detach().clone()
    dist.all_reduce(total)
    start = sum(counts[:rank])
    torch.testing.assert_close(total / world_size, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pos_logits, want_pos[start : start + counts[rank]], rtol=1e-5, atol=1e-5)
    # the dense gradient of the own queries, after DDP's mean over the ranks
    torch.testing.assert_close(q.grad / world_size, want_gq[start : start + counts[rank]], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shard.grad, want_gc[lo:hi], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("exclude", [False, True])
def test_two_shards_give_the_one_process_loss_and_gradients(exclude):
    want = _reference(exclude)
    if exclude:  # the exclusion changes the loss: the comparison can tell
        assert float(want[0]) < float(_reference(False)[0]) - 0.05
    run_multiprocess(_two_ranks, world_size=2, exclude=exclude, want=want)


def _shard_rows(rank: int, world_size: int) -> None:
    from hstu.ops.losses.vocab_parallel import local_shard_rows
    from tests.embeddings.common import build, optimizer, tables

    emb, _ = build(tables(mp_rows=24), optimizer("rowwise_adagrad"), sharded=True,
                   overrides={"ta": "row_wise"})
    full, _ = build(tables(mp_rows=24), optimizer("rowwise_adagrad"), sharded=False)
    want = full.ec.embeddings["ta"].weight.detach()
    rows, first = local_shard_rows(emb.ec, "ta", "a")
    assert rows.shape[0] > 0 and rows.requires_grad
    assert first == (0 if rank == 0 else 24 - rows.shape[0])
    torch.testing.assert_close(rows.detach(), want[first : first + rows.shape[0]])
    before = rows.detach().clone()
    rows.sum().backward()  # the fused optimizer updates the shard's rows in backward
    after, _ = local_shard_rows(emb.ec, "ta", "a")
    assert bool((after.detach() != before).any(1).all())  # every own row moved
    # and another rank's rows were never touched: the shards still tile the table
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]]))
    assert sum(int(s) for s in sizes) == 24


def test_local_shard_rows_of_a_row_wise_table():
    """Each rank's rows, read through its own lookup module (no collective), equal the unsharded
    table's, and backward updates exactly them through the fused optimizer."""
    run_multiprocess(_shard_rows, world_size=2)


def _two_ranks_bf16(rank: int, world_size: int, want) -> None:
    """The split loss with bfloat16 matmuls (RetrievalArgs.full_corpus_matmul_dtype) against the
    float32 one-process loss: within bfloat16 rounding, the target logits exact, and not the
    split float32 loss's values (it did round)."""
    from hstu.model.loss_scale import PendingScale
    from hstu.ops.gather import PendingCounts
    from hstu.ops.losses.vocab_parallel import vocab_parallel_loss

    ids, corpus, queries = _world_case()
    q0, pos, window = _rank_inputs(ids[rank], queries[rank])
    lo, hi = (0, 9) if rank == 0 else (9, 22)
    counts = PendingCounts(q0.shape[0]).wait()
    id_counts = PendingCounts(window.ids.numel()).wait()
    scale = PendingScale(torch.tensor(q0.shape[0]), True).wait()
    got = {}
    for dtype in (None, torch.bfloat16):
        q = q0.clone().requires_grad_()
        shard = corpus[lo:hi].clone().requires_grad_()
        loss, pos_logits = vocab_parallel_loss(
            q, pos, shard, MIN_ID + lo, counts=counts, temperature=T, scale=scale, window=window,
            id_counts=id_counts, corpus_grad_factor=1 / world_size, matmul_dtype=dtype,
        )
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        got[dtype] = (total / world_size, pos_logits, q.grad / world_size, shard.grad)
    want_loss, want_pos, want_gq, want_gc = want
    start = sum(counts[:rank])
    loss, pos_logits, gq, gc = got[torch.bfloat16]
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=0.0)
    # the target's logit is the exact float32 dot product
    torch.testing.assert_close(pos_logits, want_pos[start : start + counts[rank]], rtol=1e-5, atol=1e-5)
    want_q = want_gq[start : start + counts[rank]]
    assert F.cosine_similarity(gq.flatten(), want_q.flatten(), dim=0) > 0.99
    assert F.cosine_similarity(gc.flatten(), want_gc[lo:hi].flatten(), dim=0) > 0.99
    # rounded: not the float32 split loss's own values
    assert not torch.equal(loss, got[None][0]) and not torch.equal(gq, got[None][2])
    assert not torch.equal(gc, got[None][3])


def test_two_shards_in_bfloat16_stay_within_rounding_of_float32():
    run_multiprocess(_two_ranks_bf16, world_size=2, want=_reference(True))
