"""Dynamic tables: raw int64 ids of any magnitude -> rows of a fixed-capacity table.

Legend: N ids in a batch (this rank), U unique ids of a step over all ranks, C capacity
(rows of the table), D embedding dim.

Why not TorchRec's ``MCHManagedCollisionModule``: its zero-collision map only admits new
ids when an eviction pass runs (every ``eviction_interval`` steps); between passes every
unseen id is remapped to one shared "miss" row, its LFU policy may refuse to admit a new
id at all (the id then keeps sharing the miss row), ``2**63 - 1`` is its empty-slot
sentinel, and evicted rows are not re-initialised per id. The contract here is stricter:
every id looked up in a training step owns its own row in that very step, and an id that
was evicted comes back with a fresh row. :class:`DynamicIdRemapper` implements that with
a handful of vectorised torch ops; its state is replicated (identical) on every rank of
the embedding process group because each training step all-gathers the step's unique ids
and every rank applies the same deterministic update.

Eviction (when more new ids arrive than free rows exist) only considers rows not used in
the current step:
- ``lru``: smallest last-access step first, then lowest slot;
- ``lfu``: smallest access count first, then smallest last-access step, then lowest slot.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

_INT64_MAX = torch.iinfo(torch.int64).max


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit mixing hash on int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


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
    """

    def __init__(
        self,
        table_name: str,
        capacity: int,
        evict_strategy: Literal["lru", "lfu"] = "lru",
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"table {table_name}: capacity must be >= 1, got {capacity}")
        if evict_strategy not in ("lru", "lfu"):
            raise ValueError(f"table {table_name}: evict_strategy must be lru or lfu")
        self.table_name = table_name
        self.capacity = capacity
        self.evict_strategy = evict_strategy
        self.pg: dist.ProcessGroup | None = None
        kw = {"dtype": torch.int64, "device": device}
        self.register_buffer("slot_ids", torch.zeros(capacity, **kw))
        self.register_buffer("occupied", torch.zeros(capacity, dtype=torch.bool, device=device))
        self.register_buffer("last_access", torch.zeros(capacity, **kw))
        self.register_buffer("access_count", torch.zeros(capacity, **kw))
        self.register_buffer("step", torch.zeros((), **kw))
        self.register_buffer("num_admitted", torch.zeros((), **kw))
        self.register_buffer("num_evicted", torch.zeros((), **kw))
        self.register_buffer("num_eval_misses", torch.zeros((), **kw))
        # Sorted index over occupied slots, rebuilt from the persistent state on load.
        self.register_buffer("_sorted_ids", torch.zeros(0, **kw), persistent=False)
        self.register_buffer("_sorted_slots", torch.zeros(0, **kw), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.rebuild_index())
        self.pending_fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_step_evicted = 0
        self._last_step_admitted = 0

    # ----------------------------------------------------------------------- index

    @torch.no_grad()
    def rebuild_index(self) -> None:
        slots = torch.nonzero(self.occupied, as_tuple=False).flatten()
        ids = self.slot_ids[slots]
        order = torch.argsort(ids)
        self._sorted_ids = ids[order]
        self._sorted_slots = slots[order]

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [N] -> (slots [N] (0 where missing), found [N] bool)."""
        n = self._sorted_ids.numel()
        if n == 0:
            return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        pos = torch.searchsorted(self._sorted_ids, ids).clamp_(max=n - 1)
        found = self._sorted_ids[pos] == ids
        slots = torch.where(found, self._sorted_slots[pos], torch.zeros_like(ids))
        return slots, found

    def _index_update(self, removed_slots: torch.Tensor, new_ids: torch.Tensor, new_slots: torch.Tensor) -> None:
        """Merges (new_ids sorted, new_slots) into the index after dropping removed_slots."""
        keep = torch.ones_like(self._sorted_slots, dtype=torch.bool)
        if removed_slots.numel():
            is_removed = torch.zeros(self.capacity, dtype=torch.bool, device=keep.device)
            is_removed[removed_slots] = True
            keep = ~is_removed[self._sorted_slots]
        kept_ids, kept_slots = self._sorted_ids[keep], self._sorted_slots[keep]
        total = kept_ids.numel() + new_ids.numel()
        # Final position of each element = own rank + number of the other list below it.
        pos_new = torch.searchsorted(kept_ids, new_ids) + torch.arange(
            new_ids.numel(), device=new_ids.device
        )
        pos_kept = torch.searchsorted(new_ids, kept_ids) + torch.arange(
            kept_ids.numel(), device=kept_ids.device
        )
        ids = torch.empty(total, dtype=torch.int64, device=kept_ids.device)
        slots = torch.empty_like(ids)
        ids[pos_kept], slots[pos_kept] = kept_ids, kept_slots
        ids[pos_new], slots[pos_new] = new_ids, new_slots
        self._sorted_ids, self._sorted_slots = ids, slots

    # --------------------------------------------------------------------- update

    def _gather_unique(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique ids of this step over all ranks with their total counts: ([U], [U])."""
        uniq, counts = torch.unique(ids, return_counts=True)
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

    def _select_victims(self, num: int, touched: torch.Tensor) -> torch.Tensor:
        """num occupied slots not touched this step, in eviction order. touched: bool [C]."""
        evictable = self.occupied & ~touched
        if int(evictable.sum()) < num:
            raise RuntimeError(
                f"dynamic table {self.table_name}: one step looks up more distinct ids than "
                f"its capacity of {self.capacity} rows can hold; raise the capacity "
                "(DynamicEmbeddingArgs global_hbm_for_values / item_vocab_gpu_capacity / ratio)"
            )
        primary = self.last_access if self.evict_strategy == "lru" else self.access_count
        masked = torch.where(evictable, primary, torch.full_like(primary, _INT64_MAX))
        kth = torch.kthvalue(masked, num).values
        cand = torch.nonzero(masked <= kth, as_tuple=False).flatten()  # ascending slots
        if self.evict_strategy == "lfu":
            cand = cand[torch.argsort(self.last_access[cand], stable=True)]
        cand = cand[torch.argsort(primary[cand], stable=True)]
        return cand[:num]

    @torch.no_grad()
    def _admit(self, uniq: torch.Tensor, counts: torch.Tensor) -> None:
        step = int(self.step) + 1
        self.step.fill_(step)
        slots, found = self._find(uniq)
        hit = slots[found]
        self.last_access[hit] = step
        self.access_count[hit] += counts[found]
        new_ids, new_counts = uniq[~found], counts[~found]  # sorted (unique output)
        num_new = new_ids.numel()
        self._last_step_admitted, self._last_step_evicted = num_new, 0
        if num_new == 0:
            self.pending_fresh = None
            return
        free = torch.nonzero(~self.occupied, as_tuple=False).flatten()[:num_new]
        victims = free.new_zeros(0)
        if free.numel() < num_new:
            touched = torch.zeros(self.capacity, dtype=torch.bool, device=uniq.device)
            touched[hit] = True
            victims = self._select_victims(num_new - free.numel(), touched)
        new_slots = torch.cat([free, victims])
        self.slot_ids[new_slots] = new_ids
        self.occupied[new_slots] = True
        self.last_access[new_slots] = step
        self.access_count[new_slots] = new_counts
        self.num_admitted += num_new
        self.num_evicted += victims.numel()
        self._last_step_evicted = victims.numel()
        self._index_update(victims, new_ids, new_slots)
        self.pending_fresh = (new_slots, new_ids)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids int64 [N] -> (slots int64 [N], miss mask bool [N] or None).

        Training: collective over ``pg``; every rank must call it in the same step.
        """
        ids = ids.to(torch.int64)
        if self.training:
            self._admit(*self._gather_unique(ids))
            slots, found = self._find(ids)
            assert bool(found.all()), "admitted ids must be found"
            return slots, None
        slots, found = self._find(ids)
        if bool(found.all()):
            return slots, None
        self.num_eval_misses += int((~found).sum())
        return slots, ~found

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read only, in training too (no admission, no collective, no counters): ids int64
        [N] -> (slots [N], found [N] bool). For ids that must never be admitted (retrieval
        negatives, the corpus)."""
        return self._find(ids.to(torch.int64))

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
            # Always 0 by construction: no two ids ever share a row (see module doc).
            "shared_row_lookups": 0,
        }

    def extra_repr(self) -> str:
        return f"table={self.table_name}, capacity={self.capacity}, evict={self.evict_strategy}"
