"""Dynamic tables: raw int64 ids of any magnitude -> rows of a fixed-capacity table.

Legend: N ids in a batch (this rank), U unique ids of a step over all ranks, C capacity
(rows of the table), D embedding dim.

The contract, why TorchRec's ``MCHManagedCollisionModule`` does not meet it, and the costs:
docs/embeddings.md "Dynamic tables". In short: every id looked up in a training step owns its
own row in that very step, and an evicted id comes back with a fresh row. The state is host
memory (it stays there when the model moves to a GPU), replicated (identical) on every rank
of the embedding process group: each training step all-gathers the step's unique ids on the
group's host backend (gloo) and every rank applies the same deterministic update. Its
data-dependent sizes are host reads; the ops that would sync on a GPU run under
``allowed_sync(HOST_REMAP)``.

Eviction (more new ids than free rows) only considers rows not used in the current step nor
in the ``in_flight_steps`` steps before it (:data:`PIPELINE_IN_FLIGHT`):
- ``lru``: smallest last-access step first, then lowest slot (victims read from an access
  log: every row touched in a step appended once, in slot order; older entries skipped);
- ``lfu``: smallest access count first, then smallest last-access step, then lowest slot (an
  order statistic over the capacity, ``kthvalue``).
The id -> slot index is a sorted array, merged with each step's new ids.

Admission (``admit_min_count`` > 1): a new id gets its row only in the step where its count
(:class:`~hstu.embeddings.admission.CountMinSketch`, occurrences over all ranks, this step's
included) reaches ``admit_min_count``; until then its lookups are misses that read
:attr:`DynamicIdRemapper.miss_slot`, a row of the table kept for them and never an id's.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from hstu.embeddings.admission import CountMinSketch
from hstu.embeddings.hashing import GOLDEN as _GOLDEN
from hstu.embeddings.hashing import shr as _shr
from hstu.embeddings.hashing import splitmix64 as _splitmix64

_INT64_MAX = torch.iinfo(torch.int64).max

PIPELINE_IN_FLIGHT = 2
"""Batches a train pipeline holds while it reads the next one (TorchRec's sparse-dist and
prefetch pipelines: i and i + 1 while batch i + 2 is remapped): their rows are protected from
eviction (``pipeline_type="none"`` reads a batch when its step starts: nothing in flight)."""

HOST_REMAP = (
    "dynamic tables: the input stage maps host ids with host state (no device to wait for)"
)


# the recent level of a dynamic table's id index merges into the main one past
# max(_RECENT_MIN, capacity // _RECENT_FRACTION) entries
_RECENT_MIN = 4096
_RECENT_FRACTION = 8


def _merge(a: torch.Tensor, a_slots: torch.Tensor, b: torch.Tensor, b_slots: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sorted lists of distinct ids (no id in both) with their slots, merged, in
    O(len(a) + len(b) log len(a)): b's entries go to their insertion points in a, a's move up
    by the b entries before them (a running count), as no sort would."""
    n, m = a.numel(), b.numel()
    ids = torch.empty(n + m, dtype=torch.int64, device=a.device)
    slots = torch.empty_like(ids)
    at = torch.searchsorted(a, b)  # a's entries below each b entry
    dest_b = at + torch.arange(m, device=a.device)
    before = torch.zeros(n + 1, dtype=torch.int64, device=a.device)
    before.index_add_(0, at, torch.ones_like(at))
    dest_a = torch.arange(n, device=a.device) + before.cumsum(0)[:n]
    ids.index_copy_(0, dest_a, a).index_copy_(0, dest_b, b)
    slots.index_copy_(0, dest_a, a_slots).index_copy_(0, dest_b, b_slots)
    return ids, slots


def fresh_rows(ids: torch.Tensor, dim: int, bound: float, seed: int) -> torch.Tensor:
    """The initial row of each id: uniform in [-bound, bound), a pure function of (id, seed).

    ids: int64 [M] -> float32 [M, D]. Independent of slot, rank and world size, so an id
    admitted again after eviction starts from the same fresh values, and a checkpoint
    resharded to another world size initialises new ids identically.
    """
    key = _splitmix64(ids.to(torch.int64) ^ _splitmix64(torch.tensor(seed, dtype=torch.int64)))
    cols = torch.arange(dim, dtype=torch.int64, device=ids.device)
    h = _splitmix64(key.unsqueeze(1) + cols.unsqueeze(0) * _GOLDEN)  # [M, D]
    unit = _shr(h, 11).to(torch.float64) / float(1 << 53)  # [0, 1)
    return ((unit * 2.0 - 1.0) * bound).to(torch.float32)


def default_bound(num_rows: int) -> float:
    """TorchRec's default init range for a table of num_rows rows: sqrt(1 / rows)."""
    return math.sqrt(1.0 / num_rows)


class DynamicIdRemapper(nn.Module):
    """Maps raw int64 ids to slots [0, capacity) with LRU or LFU eviction.

    Persistent state (saved in ``state_dict``, identical on all ranks): ``slot_ids`` [C]
    raw id held by each slot, ``occupied`` [C], ``last_access`` [C] (training step of the
    last use), ``access_count`` [C], ``step`` and the counters behind :meth:`stats`.

    Training forward (collective over ``pg`` when distributed): admits every new id of the
    step into its own slot, evicting if needed, and records the admitted (slot, id) pairs
    in :attr:`pending_fresh` for the owner of the table to re-initialise those rows.
    Eval forward: read only, no collective; unknown ids are counted as ``eval_misses`` and
    returned with a miss mask (the caller zeroes their embeddings).

    With ``admit_min_count`` > 1 (module docstring) a new id is admitted only once counted
    that many times: the ``admission`` sketch and ``num_not_admitted`` (lookups of ids not
    admitted) join the persistent state, ``capacity`` rows hold ids and one more row,
    :attr:`miss_slot`, is what the training lookups of ids not admitted read (returned with
    a miss mask as in evaluation).
    """

    def __init__(
        self,
        table_name: str,
        capacity: int,
        evict_strategy: Literal["lru", "lfu"] = "lru",
        in_flight_steps: int = 0,
        admit_min_count: int = 1,
        sketch_width: int = 1 << 20,
        sketch_depth: int = 4,
    ) -> None:
        super().__init__()
        assert capacity >= 1 and evict_strategy in ("lru", "lfu") and in_flight_steps >= 0
        assert admit_min_count >= 1
        self.table_name = table_name
        self.capacity = capacity
        self.in_flight_steps = in_flight_steps
        self.evict_strategy = evict_strategy
        self.pg: dist.ProcessGroup | None = None
        kw = {"dtype": torch.int64}
        self.register_buffer("slot_ids", torch.zeros(capacity, **kw))
        self.register_buffer("occupied", torch.zeros(capacity, dtype=torch.bool))
        self.register_buffer("last_access", torch.zeros(capacity, **kw))
        self.register_buffer("access_count", torch.zeros(capacity, **kw))
        self.register_buffer("step", torch.zeros((), **kw))
        self.register_buffer("num_admitted", torch.zeros((), **kw))
        self.register_buffer("num_evicted", torch.zeros((), **kw))
        self.register_buffer("num_eval_misses", torch.zeros((), **kw))
        # event time (online training: the stream's clock, set_clock) of each row's last use,
        # for expiry; the clock itself; rows freed by expiry so far
        self.register_buffer("last_time", torch.zeros(capacity, **kw))
        self.register_buffer("clock", torch.zeros((), **kw))
        self.register_buffer("num_expired", torch.zeros((), **kw))
        # admission: only with admit_min_count > 1 (the state of a table without it is as before)
        self.admit_min_count = admit_min_count
        # admission: the table's row past the ids' rows, read by training lookups of ids not
        # admitted (the table has capacity + 1 rows)
        self.miss_slot = capacity
        self.admission: CountMinSketch | None = None
        if admit_min_count > 1:
            self.admission = CountMinSketch(sketch_width, sketch_depth)
            self.register_buffer("num_not_admitted", torch.zeros((), **kw))
        self._last_step_not_admitted = 0
        # The id index, rebuilt from the persistent state on load, in two sorted levels: the
        # main one (built by _compact) and the ids admitted since (small, merged into the main
        # one when it outgrows _RECENT_FRACTION of the capacity), so that a step costs the size
        # of its new ids, not of the table. An entry is live while its slot holds its id
        # (slot_ids, occupied): an evicted id's entry goes stale in place, never searched for.
        self.register_buffer("_sorted_ids", torch.zeros(0, **kw), persistent=False)
        self.register_buffer("_sorted_slots", torch.zeros(0, **kw), persistent=False)
        self.register_buffer("_recent_ids", torch.zeros(0, **kw), persistent=False)
        self.register_buffer("_recent_slots", torch.zeros(0, **kw), persistent=False)
        self._exact = True  # the main level holds exactly the live ids (nothing recent or stale)
        # LRU access log: (slot, step) entries [_log_head, _log_tail) in (step, slot) order;
        # an entry is live while last_access[slot] == its step. Rebuilt on load.
        self.register_buffer("_log_slots", torch.zeros(0, **kw), persistent=False)
        self.register_buffer("_log_steps", torch.zeros(0, **kw), persistent=False)
        self._log_head = self._log_tail = 0
        self._num_occupied = 0
        self.register_load_state_dict_post_hook(lambda module, _keys: module.rebuild_index())
        self.pending_fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_step_evicted = 0
        self._last_step_admitted = 0

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        """The state stays on the host (module docstring): ``model.to(device)``, ``.cuda()``
        and dtype casts of the whole model leave it where and what it is."""
        return self

    # ----------------------------------------------------------------------- index

    @torch.no_grad()
    def rebuild_index(self) -> None:
        slots = torch.nonzero(self.occupied, as_tuple=False).flatten()
        ids = self.slot_ids[slots]
        order = torch.argsort(ids)
        self._sorted_ids = ids[order]
        self._sorted_slots = slots[order]
        self._recent_ids = self._recent_slots = self._sorted_ids[:0]
        self._exact = True
        self._num_occupied = slots.numel()
        self._log_head = self._log_tail = 0
        if self.evict_strategy != "lru":
            return
        # the log's live entries: every occupied row once, by (last access, slot)
        by_access = slots[torch.argsort(self.last_access[slots], stable=True)]
        n = by_access.numel()
        self._log_slots = torch.empty(max(2 * n, 1024), dtype=torch.int64, device=slots.device)
        self._log_steps = torch.empty_like(self._log_slots)
        self._log_slots[:n] = by_access
        self._log_steps[:n] = self.last_access[by_access]
        self._log_head, self._log_tail = 0, n

    def _log_append(self, slots: torch.Tensor, step: int) -> None:
        """Appends the rows touched at ``step`` (in slot order); compacts when full."""
        if self.evict_strategy != "lru":
            return
        n = slots.numel()
        if self._log_tail + n > self._log_slots.numel():
            live_slots = self._log_slots[self._log_head : self._log_tail]
            live_steps = self._log_steps[self._log_head : self._log_tail]
            keep = self.last_access.index_select(0, live_slots) == live_steps
            live_slots, live_steps = live_slots[keep], live_steps[keep]
            m = live_slots.numel()
            if m + n > self._log_slots.numel():
                grown = torch.empty(2 * (m + n), dtype=torch.int64, device=slots.device)
                self._log_slots, self._log_steps = grown, torch.empty_like(grown)
            self._log_slots[:m] = live_slots
            self._log_steps[:m] = live_steps
            self._log_head, self._log_tail = 0, m
        self._log_slots[self._log_tail : self._log_tail + n] = torch.sort(slots).values
        self._log_steps[self._log_tail : self._log_tail + n] = step
        self._log_tail += n

    def _lru_victims(self, num: int, limit: int) -> torch.Tensor:
        """The num live log entries nearest the head whose last use was before step ``limit``:
        smallest (last access, slot) first. Consumes the log up to the last one taken; the
        log is in step order, so the scan stops at the first entry at or after ``limit``."""
        chunk = max(2 * num, 4096)
        found: list[torch.Tensor] = []
        have = 0
        pos = self._log_head
        while have < num and pos < self._log_tail:
            end = min(pos + chunk, self._log_tail)
            cand, cand_steps = self._log_slots[pos:end], self._log_steps[pos:end]
            stop = int(torch.searchsorted(cand_steps, limit))  # entries from here are protected
            cand, cand_steps = cand[:stop], cand_steps[:stop]
            live = torch.nonzero(self.last_access.index_select(0, cand) == cand_steps,
                                 as_tuple=False).flatten()
            take = live[: num - have]
            found.append(cand[take])
            have += take.numel()
            if have == num:
                pos = pos + int(take[-1]) + 1
            elif stop < end - pos:
                pos += stop
                break
            else:
                pos = end
            chunk *= 2
        self._log_head = pos
        if have < num:
            self._capacity_error()
        return torch.cat(found)

    def _capacity_error(self) -> None:
        window = (f" and the {self.in_flight_steps} steps before it (batches still in a train "
                  "pipeline)" if self.in_flight_steps else "")
        raise RuntimeError(
            f"dynamic table {self.table_name}: one step looks up more distinct ids than its "
            f"capacity of {self.capacity} rows can hold beside the rows used in that step{window}; "
            "raise the capacity (DynamicEmbeddingArgs global_hbm_for_values / "
            "item_vocab_gpu_capacity / ratio)"
        )

    def _find(self, keys: torch.Tensor, slots_of: torch.Tensor, ids: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One level of the index (sorted ``keys``, their ``slots_of``): (slots [N], bool [N]
        whether the entry found is live: its slot holds that id)."""
        n = keys.numel()
        if n == 0:
            return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        at = torch.searchsorted(keys, ids).clamp_(max=n - 1)
        slots = slots_of.index_select(0, at)
        live = keys.index_select(0, at) == ids
        if not self._exact:  # entries of evicted ids may remain: their slot tells
            live &= self.occupied.index_select(0, slots) & (self.slot_ids.index_select(0, slots)
                                                             == ids)
        return slots, live

    def _search(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N] -> (slots [N] (0 where missing), found [N] bool)."""
        slots, found = self._find(self._sorted_ids, self._sorted_slots, ids)
        if self._recent_ids.numel():
            recent, held = self._find(self._recent_ids, self._recent_slots, ids)
            slots, found = torch.where(held, recent, slots), found | held
        return torch.where(found, slots, torch.zeros_like(slots)), found

    def _index_update(self, new_ids: torch.Tensor, new_slots: torch.Tensor) -> None:
        """Adds the admitted (new_ids sorted, new_slots) to the recent level (their ids hold no
        live entry; a stale one of the same id there is replaced); merges the levels when the
        recent one outgrows its share. Evicted ids need nothing: their entries go stale."""
        if new_ids.numel() == 0:
            return
        self._exact = False
        recent, recent_slots = self._recent_ids, self._recent_slots
        if recent.numel():  # a re-admitted id's stale entry gives way to its new one
            at = torch.searchsorted(new_ids, recent).clamp_(max=new_ids.numel() - 1)
            stay = new_ids.index_select(0, at) != recent
            recent, recent_slots = recent[stay], recent_slots[stay]
        self._recent_ids, self._recent_slots = _merge(recent, recent_slots, new_ids, new_slots)
        if self._recent_ids.numel() > max(_RECENT_MIN, self.capacity // _RECENT_FRACTION):
            self._compact()

    def _compact(self) -> None:
        """Merges the two levels into one holding exactly the live ids (O(index))."""
        if self._exact:
            return
        main, main_slots = self._sorted_ids, self._sorted_slots
        keep = self.occupied.index_select(0, main_slots) & (
            self.slot_ids.index_select(0, main_slots) == main)
        recent, recent_slots = self._recent_ids, self._recent_slots
        held = self.occupied.index_select(0, recent_slots) & (
            self.slot_ids.index_select(0, recent_slots) == recent)
        recent, recent_slots = recent[held], recent_slots[held]
        if recent.numel() and main.numel():  # an id re-admitted into its old slot: listed once
            at = torch.searchsorted(main, recent).clamp_(max=main.numel() - 1)
            twice = main.index_select(0, at) == recent
            keep[at[twice]] = False
        self._sorted_ids, self._sorted_slots = _merge(main[keep], main_slots[keep], recent,
                                                      recent_slots)
        self._recent_ids = self._recent_slots = self._sorted_ids[:0]
        self._exact = True

    # --------------------------------------------------------------------- update

    def _gather_unique(
        self, uniq: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's unique ids with their counts -> the unique ids of this step over all
        ranks with their total counts: ([U], [U])."""
        pg = self.pg
        if pg is None or not dist.is_initialized() or dist.get_world_size(pg) == 1:
            return uniq, counts
        world = dist.get_world_size(pg)
        # gloo/nccl all_gather needs equal sizes: exchange sizes, pad, gather, strip.
        size = torch.tensor([uniq.numel()], dtype=torch.int64, device=uniq.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=pg)
        max_size = int(torch.stack(sizes).max())
        packed = torch.zeros(2, max_size, dtype=torch.int64, device=uniq.device)
        packed[0, : uniq.numel()] = uniq
        packed[1, : uniq.numel()] = counts
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=pg)
        all_ids = torch.cat([g[0, : int(s)] for g, s in zip(gathered, sizes)])
        all_counts = torch.cat([g[1, : int(s)] for g, s in zip(gathered, sizes)])
        uniq, inverse = torch.unique(all_ids, return_inverse=True)
        total = torch.zeros_like(uniq).scatter_add_(0, inverse, all_counts)
        return uniq, total

    def _select_victims(self, num: int, num_hits: int, step: int) -> torch.Tensor:
        """num occupied slots not used at ``step`` nor in the ``in_flight_steps`` before it
        (hits have last_access == step), in eviction order."""
        if self._num_occupied - num_hits < num:
            self._capacity_error()
        limit = step - self.in_flight_steps
        if self.evict_strategy == "lru":
            return self._lru_victims(num, limit)
        # lfu: (count, last access, slot) among the rows not used since step `limit`
        evictable = self.occupied & (self.last_access < limit)
        if int(evictable.sum()) < num:
            self._capacity_error()
        count = self.access_count
        masked = torch.where(evictable, count, torch.full_like(count, _INT64_MAX))
        kth = torch.kthvalue(masked, num).values
        cand = torch.nonzero(masked <= kth, as_tuple=False).flatten()  # ascending slots
        cand = cand[torch.argsort(self.last_access[cand], stable=True)]
        cand = cand[torch.argsort(count[cand], stable=True)]
        return cand[:num]

    def _count_new(
        self, new_ids: torch.Tensor, new_counts: torch.Tensor
    ) -> torch.Tensor | None:
        """Admission: counts the step's ids without a row; bool [M], which of them reach
        ``admit_min_count`` (None: every one, admission off)."""
        self._last_step_not_admitted = 0
        if self.admission is None:
            return None
        admitted = self.admission.add(new_ids, new_counts) >= self.admit_min_count
        waiting = int(new_counts[~admitted].sum())
        self.num_not_admitted += waiting
        self._last_step_not_admitted = waiting
        return admitted

    @torch.no_grad()
    def _admit(
        self, uniq: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Admits the step's unique ids (sorted) -> (their slots [U], bool [U] which of them
        hold a row: None when all do; the others read :attr:`miss_slot`)."""
        step = int(self.step) + 1
        self.step.fill_(step)
        slots, found = self._search(uniq)
        hit = slots[found]
        self.last_access[hit] = step
        self.last_time[hit] = self.clock
        self.access_count[hit] += counts[found]
        new_ids, new_counts = uniq[~found], counts[~found]  # sorted
        held = None
        admitted = self._count_new(new_ids, new_counts)
        if admitted is not None and not bool(admitted.all()):
            held = found.clone()
            held[~found] = admitted
            slots[~held] = self.miss_slot
            new_ids, new_counts = new_ids[admitted], new_counts[admitted]
        num_new = new_ids.numel()
        self._last_step_admitted, self._last_step_evicted = num_new, 0
        if num_new == 0:
            self.pending_fresh = None
            self._log_append(hit, step)
            return slots, held
        num_free = self.capacity - self._num_occupied
        free = victims = slots.new_zeros(0)
        if num_free:  # rows are never freed: the free rows are those never used yet
            free = torch.nonzero(~self.occupied, as_tuple=False).flatten()[:num_new]
        if free.numel() < num_new:
            victims = self._select_victims(num_new - free.numel(), hit.numel(), step)
        new_slots = torch.cat([free, victims])
        self.slot_ids[new_slots] = new_ids
        self.occupied[new_slots] = True
        self.last_access[new_slots] = step
        self.last_time[new_slots] = self.clock
        self.access_count[new_slots] = new_counts
        self._num_occupied += free.numel()
        self.num_admitted += num_new
        self.num_evicted += victims.numel()
        self._last_step_evicted = victims.numel()
        self._index_update(new_ids, new_slots)
        self._log_append(torch.cat([hit, new_slots]), step)
        self.pending_fresh = (new_slots, new_ids)
        slots[~found if held is None else held & ~found] = new_slots
        return slots, held

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids int64 [N] (host) -> (slots int64 [N], miss mask bool [N] or None), on the host.

        Training: collective over ``pg``; every rank must call it in the same step. Misses in
        training: ids not admitted yet (admission only).
        """
        assert ids.device.type == "cpu", "the input stage maps host ids (before the copy)"
        ids = ids.to(torch.int64)
        if self.training:
            local, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
            uniq, total = self._gather_unique(local, counts)
            uniq_slots, held = self._admit(uniq, total)
            if uniq.numel() != local.numel():  # other ranks' ids too: find ours among them
                ours = torch.searchsorted(uniq, local)
                uniq_slots = uniq_slots[ours]
                held = None if held is None else held[ours]
            if held is None or bool(held.all()):
                return uniq_slots[inverse], None
            return uniq_slots[inverse], ~held[inverse]
        slots, found = self._search(ids)
        if bool(found.all()):
            return slots, None
        self.num_eval_misses += int((~found).sum())
        return slots, ~found

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read only, in training too (no admission, no collective, no counters): ids int64
        [N] -> (slots [N], found [N] bool), on the host. For ids that must never be admitted
        (retrieval negatives, the corpus)."""
        slots, found = self._search(ids.to("cpu", torch.int64))
        return slots, found

    @torch.no_grad()
    def set_clock(self, event_time: int) -> None:
        """The event time (seconds) that rows used from now on are stamped with (online
        training: the newest event of the window being trained)."""
        self.clock.fill_(int(event_time))

    @torch.no_grad()
    def expire(self, before: int) -> int:
        """Frees the occupied rows whose last use was stamped before event time ``before``
        (their ids come back with fresh rows when seen again); returns how many. The same on
        every rank (the state is replicated; call it on every rank with the same ``before``)."""
        old = self.occupied & (self.last_time < int(before))
        n = int(old.sum())
        if n:
            self.occupied[old] = False
            self.slot_ids[old] = 0
            self.last_access[old] = 0
            self.access_count[old] = 0
            self.last_time[old] = 0
            self.num_expired += n
            self.rebuild_index()
        return n

    def _live_start(self, min_id: int) -> int:
        """Where the ids >= ``min_id`` start in the sorted index (merged first: exact)."""
        self._compact()
        bound = torch.tensor([min_id], dtype=torch.int64)
        return int(torch.searchsorted(self._sorted_ids, bound)[0])

    @torch.no_grad()
    def live_ids(self, min_id: int = 0) -> torch.Tensor:
        """The raw ids the occupied slots hold, those >= ``min_id``: int64 [L], ascending (the
        same on every rank). Read only."""
        start = self._live_start(min_id)  # (merges the index first)
        return self._sorted_ids[start:].clone()

    @torch.no_grad()
    def draw_live(
        self, num: int, seed: int, min_id: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``num`` draws, uniform with replacement, over the occupied slots whose id is >=
        ``min_id``: (slots int64 [num], their ids [num], L the number of such slots; empty
        draws when L is 0). Read only (nothing admitted, no access recorded, no collective).

        A pure function of (``seed``, :attr:`step`, the set of live ids): the state is
        replicated, so every rank draws the same rows in the same step. Draw i is the live id
        at position ``splitmix64(key + i) mod L`` of the ascending ids (a modulo bias below
        L / 2**63)."""
        start = self._live_start(min_id)
        live = self._sorted_ids.numel() - start
        if live == 0 or num <= 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty.clone(), live
        key = _splitmix64(
            torch.tensor(seed, dtype=torch.int64) ^ _splitmix64(self.step.clone().cpu())
        )
        draws = torch.arange(num, dtype=torch.int64)
        pick = _shr(_splitmix64(key + draws * _GOLDEN), 1) % live + start
        return self._sorted_slots[pick], self._sorted_ids[pick], live

    def stats(self) -> dict[str, int | float]:
        """Figures for the training log: occupancy and eviction counters."""
        occupied = int(self.occupied.sum())
        return {
            "capacity": self.capacity,
            "occupied": occupied,
            "occupancy": occupied / self.capacity,
            "step": int(self.step),
            "admitted_total": int(self.num_admitted),
            "evicted_total": int(self.num_evicted),
            "admitted_last_step": self._last_step_admitted,
            "evicted_last_step": self._last_step_evicted,
            "eval_misses_total": int(self.num_eval_misses),
            "expired_total": int(self.num_expired),
            # lookups in training of ids not admitted yet (admit_min_count; 0 without)
            "not_admitted_total": 0 if self.admission is None else int(self.num_not_admitted),
            "not_admitted_last_step": self._last_step_not_admitted,
            # Always 0 by construction: no two ids ever share a row (see module doc).
            "shared_row_lookups": 0,
        }

    def extra_repr(self) -> str:
        admit = f", admit_min_count={self.admit_min_count}" if self.admission is not None else ""
        return (f"table={self.table_name}, capacity={self.capacity}, evict={self.evict_strategy}, "
                f"in_flight_steps={self.in_flight_steps}{admit}")
