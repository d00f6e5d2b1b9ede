"""Dynamic tables far below their distinct ids, evictions every step: the remapper against a
plain-Python model of the same policy (which ids are held, in which rows), and exact resume."""

from __future__ import annotations

import pytest
import torch

from hstu.embeddings import DynamicIdRemapper


class _Reference:
    """Global LRU / LFU over rows: free rows lowest first; victims among rows not used this
    step nor in the ``in_flight`` steps before it, smallest (last access, slot) for lru,
    (count, last access, slot) for lfu."""

    def __init__(self, capacity: int, policy: str, in_flight: int = 0) -> None:
        self.capacity, self.policy, self.in_flight = capacity, policy, in_flight
        self.row_of: dict[int, int] = {}
        self.last = [0] * capacity
        self.count = [0] * capacity
        self.held: list[int | None] = [None] * capacity
        self.step = 0

    def __call__(self, ids: list[int]) -> list[int]:
        self.step += 1
        counts: dict[int, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        new = sorted(i for i in counts if i not in self.row_of)
        for i, n in counts.items():
            if i in self.row_of:
                r = self.row_of[i]
                self.last[r] = self.step
                self.count[r] += n
        free = [r for r in range(self.capacity) if self.held[r] is None]
        cand = [r for r in range(self.capacity) if self.held[r] is not None
                and self.last[r] < self.step - self.in_flight]
        key = (lambda r: (self.last[r], r)) if self.policy == "lru" else (lambda r: (self.count[r], self.last[r], r))
        rows = (free + sorted(cand, key=key))[: len(new)]
        for i, r in zip(new, rows):
            if self.held[r] is not None:
                del self.row_of[self.held[r]]
            self.held[r], self.row_of[i] = i, r
            self.last[r], self.count[r] = self.step, counts[i]
        return [self.row_of[i] for i in ids]


def _batches(seed: int, steps: int, per_step: int, distinct: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # raw ids spread over the int64 range; a hot head so hits and misses mix
    out = []
    for _ in range(steps):
        raw = torch.randint(0, distinct, (per_step,), generator=gen)
        raw[: per_step // 4] = torch.randint(0, 20, (per_step // 4,), generator=gen)
        out.append(raw * 7919 - 10**15)
    return out


@pytest.mark.parametrize("in_flight", [0, 2])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_capacity_64_over_1000_ids_matches_the_reference_row_for_row(policy: str, in_flight: int) -> None:
    capacity = 64 if in_flight == 0 else 160  # three steps of up to 40 distinct ids stay held
    r = DynamicIdRemapper("t", capacity=capacity, evict_strategy=policy, in_flight_steps=in_flight).train()
    ref = _Reference(capacity, policy, in_flight)
    for ids in _batches(0, 150, 40, 1000):
        slots, miss = r(ids)
        assert miss is None
        assert slots.tolist() == ref(ids.tolist())
        assert r.slot_ids[r.occupied].tolist() == [ref.held[s] for s in range(capacity)
                                                   if ref.held[s] is not None]
        assert r.last_access.tolist() == ref.last and r.access_count.tolist() == ref.count
    assert r.stats()["evicted_total"] > 2000


def test_rows_of_batches_in_flight_are_never_evicted() -> None:
    """Under a pipeline the rows of the two batches before the one being remapped are still
    to be looked up / updated: none of them is evicted; too few other rows is one clear error."""
    r = DynamicIdRemapper("t", capacity=90, evict_strategy="lru", in_flight_steps=2).train()
    batches = _batches(11, 60, 30, 2000)
    history: list[set[int]] = []
    for ids in batches:
        before = dict(zip(r.slot_ids[r.occupied].tolist(), r.occupied.nonzero().flatten().tolist()))
        r(ids)
        after = dict(zip(r.slot_ids[r.occupied].tolist(), r.occupied.nonzero().flatten().tolist()))
        for recent in history[-2:]:
            for i in recent:  # still held, in the same row
                assert after[i] == before[i]
        history.append(set(ids.tolist()))
    tight = DynamicIdRemapper("t", capacity=40, evict_strategy="lfu", in_flight_steps=2).train()
    with pytest.raises(RuntimeError, match="capacity of 40 rows.*2 steps before it"):
        for ids in batches:
            tight(ids)


def test_many_steps_with_the_access_log_compacted_match_the_reference() -> None:
    # 300 steps of 30 ids at capacity 50: the LRU log is compacted many times
    r = DynamicIdRemapper("t", capacity=50, evict_strategy="lru").train()
    ref = _Reference(50, "lru")
    for ids in _batches(3, 300, 30, 400):
        assert r(ids)[0].tolist() == ref(ids.tolist())
    assert r.stats()["evicted_total"] > 3000


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_resume_from_state_dict_continues_exactly(policy: str) -> None:
    batches = _batches(5, 80, 50, 3000)
    a = DynamicIdRemapper("t", capacity=128, evict_strategy=policy).train()
    for ids in batches[:40]:
        a(ids)
    b = DynamicIdRemapper("t", capacity=128, evict_strategy=policy).train()
    b.load_state_dict(a.state_dict())
    for ids in batches[40:]:
        assert torch.equal(a(ids)[0], b(ids)[0])
    for name in ("slot_ids", "occupied", "last_access", "access_count"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("capacity", [200, 3000])
def test_the_index_finds_every_held_id_and_no_other_under_eviction(capacity: int) -> None:
    """The index in two levels (ids admitted since the last merge apart, evicted ids' entries
    left stale): after every step each held id is found at its slot and no evicted or unseen
    id is; merged (as live_ids merges it, every 10 steps here), it lists exactly the held ids,
    sorted. The recent level merges past 4096 entries: stale entries pile up in both levels
    between merges (asserted: the lazy path is what ran)."""
    r = DynamicIdRemapper("t", capacity=capacity, evict_strategy="lru").train()
    seen: set[int] = set()
    stale = 0
    for step, ids in enumerate(_batches(7, 150, 120, 10 * capacity)):
        r(ids)
        seen.update(ids.tolist())
        held = r.occupied.nonzero().flatten()
        slots, found = r.lookup(r.slot_ids[held])
        assert bool(found.all()) and torch.equal(slots, held)
        gone = torch.tensor(sorted(seen - set(r.slot_ids[held].tolist())), dtype=torch.int64)
        if gone.numel():
            assert not bool(r.lookup(gone)[1].any())
        entries = r._sorted_ids.numel() + r._recent_ids.numel()
        stale = max(stale, entries - held.numel())
        if step % 10 == 9:
            live = r.live_ids(-(2**63))  # merges the levels (the batches hold negative ids)
            assert torch.equal(live, torch.sort(r.slot_ids[held]).values)
            assert torch.equal(r.slot_ids[r._sorted_slots], r._sorted_ids)
            assert r._recent_ids.numel() == 0
    assert stale > 100  # entries of evicted ids were searched past, not removed at once
    assert r.stats()["evicted_total"] > capacity
