"""Admission of dynamic tables (DynamicEmbeddingArgs.admit_min_count): an id gets a row at its
min_count-th occurrence, not before; the count-min sketch never undercounts and halves on
schedule; the state resumes bitwise; 2 processes hold the state of 1; min_count = 1 is the
table without admission, bitwise; bad settings are refused in one line."""

from __future__ import annotations

import io
import os

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.args import DynamicEmbeddingArgs
from hstu.embeddings import DynamicIdRemapper, build_embedding_collection, fresh_rows
from hstu.embeddings.admission import CountMinSketch
from hstu.embeddings.collection import apply_misses, table_seed
from hstu.embeddings.dynamic import default_bound
from hstu.validation import ConfigError
from tests.dist_utils import run_multiprocess
from tests.embeddings.test_dynamic_reference import _batches, _Reference


def _emb(min_count: int, capacity: int = 8):
    table = DynamicEmbeddingArgs(
        feature_names=["item"], table_name="t", item_vocab_size_or_capacity=10**9,
        item_vocab_gpu_capacity=capacity, admit_min_count=min_count, admit_sketch_width=4096,
    )
    return build_embedding_collection([table], {"t": 8}, "cpu", seed=3, sparse_optimizer="sgd")


def _lookup(emb, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training lookup of ``ids``: (their rows, misses zeroed as the model does; the miss
    mask or None)."""
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item"], values=torch.tensor(ids, dtype=torch.int64), lengths=torch.tensor([len(ids)])
    )
    remapped, misses = emb.remap(kjt)
    rows = apply_misses(emb(remapped), misses)["item"].values().detach()
    return rows, misses.get("item")


def test_an_id_seen_twice_has_no_row_and_its_third_occurrence_gets_a_fresh_one() -> None:
    emb = _emb(min_count=3).train()
    r = emb.remappers["t"]
    a, b = 2**62 + 5, -17
    fresh = lambda i: fresh_rows(torch.tensor([i]), 8, default_bound(8), table_seed(3, "t"))
    for _ in range(2):  # seen twice: no row, a miss, a zero embedding
        rows, miss = _lookup(emb, [a])
        assert miss is not None and miss.tolist() == [True]
        assert torch.equal(rows, torch.zeros(1, 8))
        assert a not in r.live_ids(-(2**63)).tolist()
    assert int(r.occupied.sum()) == 0
    # the 3rd occurrence: a's row, with its fresh values; b (first seen) still misses
    rows, miss = _lookup(emb, [b, a])
    assert miss.tolist() == [True, False]
    assert torch.equal(rows[1], fresh(a)[0]) and torch.equal(rows[0], torch.zeros(8))
    assert r.live_ids(-(2**63)).tolist() == [a]
    # three occurrences in one step: admitted in that step (occurrences, not steps, count)
    rows, miss = _lookup(emb, [7, 7, 7])
    assert miss is None and torch.equal(rows[0], fresh(7)[0])
    s = r.stats()
    assert s["not_admitted_total"] == 3 and s["not_admitted_last_step"] == 0
    assert s["admitted_total"] == 2 and s["capacity"] == 7  # of 8 rows, one kept for misses
    assert "not admitted 3" in emb.log_stats()
    # misses read the kept row, never an id's
    slots, held = r.lookup(torch.tensor([a, 7]))
    assert held.all() and r.miss_slot == 7 and r.miss_slot not in slots.tolist()
    # evaluation: read only, nothing counted
    r.eval()
    before = r.admission.counters.clone()
    _, miss = r(torch.tensor([b, 999]))
    assert miss.tolist() == [True, True] and torch.equal(r.admission.counters, before)


class _AdmittingReference(_Reference):
    """The reference LRU / LFU table with exact counts: an id without a row is counted (all
    occurrences of the step) and gets its row once its count reaches ``min_count``; None
    for the lookups of the others."""

    def __init__(self, capacity: int, policy: str, min_count: int) -> None:
        super().__init__(capacity, policy)
        self.min_count = min_count
        self.seen: dict[int, int] = {}

    def __call__(self, ids: list[int]) -> list[int | None]:
        waiting = [i for i in dict.fromkeys(ids) if i not in self.row_of]
        for i in waiting:
            self.seen[i] = self.seen.get(i, 0) + ids.count(i)
        out = [i for i in waiting if self.seen[i] < self.min_count]
        rows = super().__call__([i for i in ids if i not in out])
        row = dict(zip([i for i in ids if i not in out], rows))
        return [row.get(i) for i in ids]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_admission_under_eviction_matches_an_exact_reference(policy: str) -> None:
    """A sketch wide enough to count ~1,000 ids exactly here: the same ids admitted in the
    same rows as exact counting, evictions every step (64 rows)."""
    r = DynamicIdRemapper("t", 64, policy, admit_min_count=3, sketch_width=1 << 16).train()
    ref = _AdmittingReference(64, policy, 3)
    waited = 0
    for ids in _batches(0, 150, 40, 1000):
        slots, miss = r(ids)
        want = ref(ids.tolist())
        missed = [False] * ids.numel() if miss is None else miss.tolist()
        assert [None if m else s for s, m in zip(slots.tolist(), missed)] == want
        waited += sum(w is None for w in want)
        if miss is not None:
            assert bool((slots[miss] == r.miss_slot).all())
    assert r.stats()["not_admitted_total"] == waited > 500
    assert r.stats()["evicted_total"] > 1000


def test_min_count_1_is_the_table_without_admission_bitwise() -> None:
    plain = DynamicIdRemapper("t", 64, "lru").train()
    one = DynamicIdRemapper("t", 64, "lru", admit_min_count=1).train()
    ref = _Reference(64, "lru")
    for ids in _batches(1, 60, 40, 1000):
        a, b = plain(ids), one(ids)
        assert b[1] is None and torch.equal(a[0], b[0]) and b[0].tolist() == ref(ids.tolist())
    sa, sb = plain.state_dict(), one.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert one.admission is None
    # built from the gin fields: the same table rows and remapper as before admission existed
    emb = _emb(min_count=1)
    assert emb.remappers["t"].capacity == emb.specs["t"].num_rows == 8
    assert emb.specs["t"].sketch_bytes == 0


def test_the_sketch_never_undercounts_and_halves_every_width_occurrences() -> None:
    """64 counters a row for ~300 ids (collisions everywhere): every estimate is at least the
    exact count, halved (floor) whenever 64 occurrences have been added since the last time."""
    sketch = CountMinSketch(width=64, depth=3)
    exact: dict[int, int] = {}
    gen = torch.Generator().manual_seed(4)
    added = halvings = 0
    for _ in range(200):
        ids = torch.unique(torch.randint(0, 300, (12,), generator=gen) * 1_000_003)
        counts = torch.randint(1, 4, (ids.numel(),), generator=gen)
        sketch.add(ids, counts)
        for i, c in zip(ids.tolist(), counts.tolist()):
            exact[i] = exact.get(i, 0) + c
        added += int(counts.sum())
        if added >= 64:
            exact = {i: c // 2 for i, c in exact.items()}
            added, halvings = 0, halvings + 1
        keys = torch.tensor(list(exact))
        est = sketch.estimate(keys)
        assert bool((est >= torch.tensor(list(exact.values()))).all())
    assert int(sketch.num_halvings) == halvings > 10
    assert int(sketch.occurrences) == added
    assert int(sketch.counters.max()) < 64 + 3 * 12  # halving bounds the counters


def test_the_state_resumes_bitwise() -> None:
    batches = _batches(5, 80, 50, 3000)
    a = DynamicIdRemapper("t", 128, "lfu", admit_min_count=2, sketch_width=512).train()
    for ids in batches[:40]:
        a(ids)
    assert int(a.admission.num_halvings) > 0  # the sketch's halving state is part of it
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = DynamicIdRemapper("t", 128, "lfu", admit_min_count=2, sketch_width=512).train()
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a.admission.counters, b.admission.counters)
    for ids in batches[40:]:
        (sa, ma), (sb, mb) = a(ids), b(ids)
        assert torch.equal(sa, sb) and (ma is None) == (mb is None)
        assert ma is None or torch.equal(ma, mb)
    sa, sb = a.state_dict(), b.state_dict()
    assert {"admission.counters", "admission.occurrences", "admission.num_halvings",
            "num_not_admitted"} <= set(sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _two_ranks(rank: int, world_size: int, tmp: str) -> None:
    import torch.distributed as dist

    r = DynamicIdRemapper("t", 64, "lru", admit_min_count=3, sketch_width=256).train()
    r.pg = dist.group.WORLD
    out = []
    for ids in _batches(9, 60, 40, 600):
        mine = ids[rank::world_size]  # each rank looks up its share of the global batch
        slots, miss = r(mine)
        out.append((mine, slots, miss))
    torch.save({"state": r.state_dict(), "steps": out}, os.path.join(tmp, f"rank{rank}.pt"))


def test_two_processes_hold_the_state_of_one(tmp_path) -> None:
    run_multiprocess(_two_ranks, world_size=2, tmp=str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    one = DynamicIdRemapper("t", 64, "lru", admit_min_count=3, sketch_width=256).train()
    missed = 0
    for step, ids in enumerate(_batches(9, 60, 40, 600)):
        slots, miss = one(ids)
        miss = torch.zeros_like(ids, dtype=torch.bool) if miss is None else miss
        missed += int(miss.sum())
        for k in range(2):  # each rank's ids got the slots (and misses) one process gives them
            mine, s, m = ranks[k]["steps"][step]
            assert torch.equal(mine, ids[k::2])
            assert torch.equal(s, slots[k::2])
            assert torch.equal(miss[k::2], torch.zeros_like(mine, dtype=torch.bool) if m is None else m)
    assert missed > 100 and int(one.admission.num_halvings) > 0
    for k in range(2):  # identical state on both ranks, and that of one process
        state = ranks[k]["state"]
        assert list(state) == list(one.state_dict())
        assert all(torch.equal(state[n], v) for n, v in one.state_dict().items()), k


def test_bad_settings_are_refused_in_one_line() -> None:
    # (through gin and the entry point: tests/test_refusals.py, one error line)
    with pytest.raises(ConfigError, match=r"DynamicEmbeddingArgs\.admit_min_count.*>= 1.*got 0"):
        DynamicEmbeddingArgs(feature_names=["i"], table_name="t", item_vocab_size_or_capacity=10,
                             admit_min_count=0)
    with pytest.raises(ConfigError, match="admit_sketch_depth"):
        DynamicEmbeddingArgs(feature_names=["i"], table_name="t", item_vocab_size_or_capacity=10,
                             admit_sketch_depth=0)
    one_row = DynamicEmbeddingArgs(feature_names=["i"], table_name="t",
                                   item_vocab_size_or_capacity=1, admit_min_count=2)
    with pytest.raises(ValueError, match="keeps one row for ids not admitted") as info:
        build_embedding_collection([one_row], {"t": 4}, "cpu", sparse_optimizer="sgd")
    assert "\n" not in str(info.value)
