"""Dynamic tables on one process: eviction order, capacity, fresh rows, 64-bit ids."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.args import DynamicEmbeddingArgs
from hstu.embeddings import DynamicIdRemapper, build_embedding_collection, fresh_rows
from hstu.embeddings.collection import table_seed
from hstu.embeddings.dynamic import default_bound

BIG = 2**63 - 1


def _step(r: DynamicIdRemapper, ids: list[int]) -> torch.Tensor:
    slots, miss = r(torch.tensor(ids, dtype=torch.int64))
    assert miss is None
    assert int(r.occupied.sum()) <= r.capacity
    return slots


def _held(r: DynamicIdRemapper) -> set[int]:
    return set(r.slot_ids[r.occupied].tolist())


def test_lru_evicts_least_recently_used() -> None:
    r = DynamicIdRemapper("t", capacity=3, evict_strategy="lru").train()
    for ids in ([10], [20], [30], [10], [40]):  # 20 is the least recently used at [40]
        _step(r, ids)
    assert _held(r) == {10, 30, 40}
    _step(r, [50])  # now 30 is the oldest
    assert _held(r) == {10, 40, 50}
    assert r.stats()["evicted_total"] == 2


def test_lfu_evicts_least_frequently_used() -> None:
    r = DynamicIdRemapper("t", capacity=3, evict_strategy="lfu").train()
    for ids in ([10, 10, 10], [20], [30, 30], [20, 20], [40]):  # counts 10:3 20:3 30:2
        _step(r, ids)
    assert _held(r) == {10, 20, 40}
    # 40 (count 1) is now least frequent even though it is the most recent
    _step(r, [50])
    assert _held(r) == {10, 20, 50}
    # tie on count 1 between 50 and 60 after admitting 60: older (50) goes
    _step(r, [60])
    assert _held(r) == {10, 20, 60}


def test_distinct_ids_never_share_a_slot_and_occupancy_bounded() -> None:
    torch.manual_seed(0)
    r = DynamicIdRemapper("t", capacity=64, evict_strategy="lfu").train()
    for _ in range(50):
        ids = torch.randint(-(2**63), 2**63 - 1, (40,), dtype=torch.int64)
        ids[:10] = torch.randint(0, 20, (10,))  # some hot ids
        slots, _ = r(ids)
        uniq, inv = torch.unique(ids, return_inverse=True)
        per_id = torch.full((uniq.numel(),), -1, dtype=torch.int64).scatter_(0, inv, slots)
        assert per_id.unique().numel() == uniq.numel(), "two ids share a row"
        assert int(r.occupied.sum()) <= 64
        held = r.slot_ids[per_id]
        assert torch.equal(held, uniq)
    assert r.stats()["evicted_total"] > 0


def test_capacity_smaller_than_one_step_is_an_error() -> None:
    r = DynamicIdRemapper("t", capacity=2).train()
    with pytest.raises(RuntimeError, match="capacity"):
        r(torch.tensor([1, 2, 3]))


def test_eval_does_not_admit_and_counts_misses() -> None:
    r = DynamicIdRemapper("t", capacity=4).train()
    r(torch.tensor([5, 6]))
    r.eval()
    _slots, miss = r(torch.tensor([5, 7]))
    assert miss is not None and miss.tolist() == [False, True]
    assert _held(r) == {5, 6} and r.stats()["eval_misses_total"] == 1


def _emb(capacity: int, strategy: str = "lru"):
    table = DynamicEmbeddingArgs(
        feature_names=["item"], table_name="item_table", item_vocab_size_or_capacity=10**9,
        item_vocab_gpu_capacity=capacity, evict_strategy=strategy,
    )
    return build_embedding_collection([table], {"item_table": 8}, "cpu", seed=3, sparse_optimizer="sgd")


def _lookup(emb, ids: list[int]) -> torch.Tensor:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item"], values=torch.tensor(ids, dtype=torch.int64), lengths=torch.tensor([len(ids)])
    )
    return emb.lookup(kjt)["item"].values()


def test_evicted_id_returns_with_fresh_row_never_another_ids_row() -> None:
    emb = _emb(capacity=2).train()
    a, b, c = BIG, BIG - 1, -(2**63)  # ids at the ends of the int64 range
    first_a = _lookup(emb, [a]).detach().clone()
    assert torch.equal(first_a, fresh_rows(torch.tensor([a]), 8, default_bound(2), table_seed(3, "item_table")))
    # "train" a's row: write something no fresh row can be
    weight = emb.ec.embeddings["item_table"].weight
    slot_a = int(emb.remappers["item_table"].lookup(torch.tensor([a]))[0])
    with torch.no_grad():
        weight[slot_a] = 7.0
    _lookup(emb, [b])
    row_c = _lookup(emb, [c]).detach().clone()  # evicts a (least recently used)
    assert not bool((row_c == 7.0).any()), "c inherited a's trained row"
    assert torch.equal(row_c, fresh_rows(torch.tensor([c]), 8, default_bound(2), table_seed(3, "item_table")))
    back_a = _lookup(emb, [a]).detach()  # a returns: evicts b, gets a fresh row
    assert torch.equal(back_a, first_a)
    assert emb.stats()["item_table"]["evicted_total"] == 2
    assert "shared-row lookups 0" in emb.log_stats(step=4)


def test_fresh_rows_are_deterministic_and_distinct() -> None:
    ids = torch.tensor([0, 1, 2**62, BIG, -5])
    rows = fresh_rows(ids, 16, 0.1, seed=1)
    assert torch.equal(rows, fresh_rows(ids, 16, 0.1, seed=1))
    assert rows.abs().max() <= 0.1 and rows.unique(dim=0).shape[0] == 5
    assert not torch.equal(rows, fresh_rows(ids, 16, 0.1, seed=2))
