"""Exponential moving average of the weights (``TrainerArgs.ema_decay``; what it covers, how
it is evaluated, saved and exported: docs/training.md, "Weight average").

After every optimizer step ``avg <- avg + (1 - d_t) (w - avg)``, ``d_t = min(decay, (1 + t) /
(10 + t))`` after t updates. Dense parameters (their float32 masters under half precision)
and data_parallel tables are updated eagerly.

Tables of FBGEMM's fused kernels are averaged lazily: between two changes a row's weight w is
constant, so k updates compose to ``avg <- w + P (avg - w)`` with P the product of their
decays. Each row keeps ``last`` (int64 [R]), the update from which its average follows its
current weight: the average after update k is ``w + P(last..k) (avg - w)``. A row that step n
looks up is caught up to n in the kernel's forward (before backward changes it) and gets
``last = n``, so ``update()`` only counts for it. Every row is caught up when the average is
read (evaluation, a save), so a save's rows all have ``last == ema_updates`` and ``last`` is
not saved. P = exp(L(k) - L(last)) with L(k) = sum_{t<k} log d_t in closed form (``lgamma``
for the warm-up part, then k log decay), float64.

Checkpoints: the dense part in the dense file (``"ema"``: child -> parameter -> tensor, like
``"model"``; ``"ema_updates"``), the tables' part through DCP under
``hstu.training.checkpoint.EMA_TABLES_KEY``, sharded like the weight itself.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hstu.training.checkpoint import CheckpointError, state_tensors
from hstu.training.optimizer import LookupHook, fused_kernels, hook_training_lookups, kernel_rows

# profiler label of the average's work in a step (python -m hstu.bench reports its time)
PROFILE_LABEL = "hstu::weight_average"

# table weights among embedding_state_dict's keys (not optimizer state, not remapper buffers)
_TABLE_WEIGHT = re.compile(r"(^|\.)(dp_)?tables\..*\.weight$")


def is_table_weight(key: str) -> bool:
    return _TABLE_WEIGHT.search(key) is not None


def _like(value: Any, locals_: list[torch.Tensor]) -> Any:
    """A value sharded like ``value`` (a ShardedTensor, or a replicated tensor) whose local
    parts are ``locals_`` (what DCP saves, or fills in place on a load)."""
    if hasattr(value, "local_shards"):
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

        shards = [
            Shard(tensor=t, metadata=s.metadata) for t, s in zip(locals_, value.local_shards())
        ]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group
        )
    return locals_[0]


_SWAP_ROWS = 1 << 16  # rows exchanged at a time when the average is swapped in


def _swap_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchanges the values of two same-shape float32 tensors in place, one chunk of rows
    through a temporary at a time."""
    a2, b2 = (t.view(t.shape[0], -1) if t.dim() else t.view(1, 1) for t in (a, b))
    for lo in range(0, a2.shape[0], _SWAP_ROWS):
        hi = min(lo + _SWAP_ROWS, a2.shape[0])
        tmp = a2[lo:hi].clone()
        a2[lo:hi].copy_(b2[lo:hi])
        b2[lo:hi].copy_(tmp)


class _LazyTable:
    """One table of a fused kernel (this rank's part): its live weight (the kernel's storage),
    the average [R, D] float32 and ``last`` int64 [R], the update from which each row's
    average follows its current weight."""

    def __init__(self, weight: torch.Tensor, shadow: torch.Tensor,
                 last: torch.Tensor | None = None) -> None:
        self.weight, self.shadow = weight, shadow
        self.last = last if last is not None else torch.zeros(
            weight.shape[0], dtype=torch.int64, device=weight.device)


def _one_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The tables of a kernel as one [sum R, D] view of its storage, when they lie one
    after another with one width and dtype; else None."""
    first = weights[0]
    if any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype
           or not w.is_contiguous() for w in weights):
        return None
    at = first.data_ptr()
    for w in weights:
        if w.data_ptr() != at:
            return None
        at += w.numel() * w.element_size()
    return first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), (first.shape[1], 1))


class WeightAverage:
    """The average of a model's weights (see the module docstring).

    ``dense``: child name -> module (the checkpoint's dense children); ``tables``: the
    tables' live state (``embedding_state_dict``); ``optimizer``: gives the float32 master of
    a half-precision parameter (``master_of``), or None; ``model``: where the fused kernels
    of the sharded tables are found (their rows are averaged lazily), or None (every
    tensor averaged eagerly)."""

    def __init__(
        self, dense: dict[str, nn.Module], tables: dict[str, Any], optimizer: Any,
        decay: float, model: nn.Module | None = None,
    ) -> None:
        assert 0.0 < decay < 1.0, decay  # TrainerArgs.ema_decay, checked in hstu.args
        self.decay = decay
        self.num_updates = 0
        # d_t = (1 + t) / (10 + t) for t < warm, decay from then on
        warm = max(0, math.ceil((10.0 * decay - 1.0) / (1.0 - decay)))
        while warm > 0 and (float(warm)) / (9.0 + warm) >= decay:
            warm -= 1
        while (1.0 + warm) / (10.0 + warm) < decay:
            warm += 1
        self._warm = warm
        # dense: ((child, name), tensor the optimizer updates, tensor the forward reads)
        self.dense: list[tuple[tuple[str, str], torch.Tensor, torch.Tensor | None]] = []
        for child_name, child in dense.items():
            for name, p in child.named_parameters():
                if not p.requires_grad:
                    continue
                master = optimizer.master_of(p) if optimizer is not None else None
                self.dense.append(((child_name, name), p if master is None else master,
                                   None if master is None else p))
        # tables: key -> (live value, its local tensors)
        self.tables: dict[str, tuple[Any, list[torch.Tensor]]] = {
            key: (value, state_tensors(value))
            for key, value in tables.items() if is_table_weight(key)
        }
        self._live = [t for _, t, _ in self.dense] + [
            t for _, ts in self.tables.values() for t in ts
        ]
        # the average of each live tensor (a fused kernel's tables share one buffer: below)
        self.shadow: list[torch.Tensor] = [None] * len(self._live)  # type: ignore[list-item]
        self.lazy: list[_LazyTable] = []
        self._handles: list[Any] = []
        self._log_table = torch.zeros(0, dtype=torch.float64)  # L(k), k = 0, 1, ...
        lazy_ids = self._attach_kernels(model) if model is not None else set()
        for i, t in enumerate(self._live):
            if self.shadow[i] is None:
                self.shadow[i] = t.detach().float().clone()
        n = len(self.dense)
        self._table_ids: dict[str, range] = {}  # key -> its tensors' indices into ``_live``
        for key, (_, ts) in self.tables.items():
            self._table_ids[key] = range(n, n + len(ts))
            n += len(ts)
        self._eager = [i for i in range(len(self._live)) if i not in lazy_ids]
        self._swapped_in_place: set[int] = set()
        self._backup: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ lazy rows
    def _attach_kernels(self, model: nn.Module) -> set[int]:
        """Finds each fused kernel's per-table weight among the live tensors (the same
        storage), gives its tables their averages and hooks its forward; returns the indices
        (into ``_live``) averaged lazily. When the kernel's tables lie one after another in
        its storage with one width and dtype (TorchRec's grouping makes that the rule), their
        averages are one buffer too and a lookup catches up all of its rows in one pass."""
        from torchrec.distributed.model_parallel import DistributedModelParallel

        from hstu.embeddings.sharding import _find_embedding_modules

        where = {(t.data_ptr(), tuple(t.shape)): i for i, t in enumerate(self._live)}
        lazy: set[int] = set()
        for emb in _find_embedding_modules(model):
            if not isinstance(emb.ec, DistributedModelParallel):
                continue
            for tbe in fused_kernels(emb.ec.module):
                weights = tbe.split_embedding_weights()
                ids = [where.get((w.data_ptr(), tuple(w.shape))) for w in weights]
                ids = [None if i is None or i in lazy else i for i in ids]
                if all(i is None for i in ids):
                    continue
                joint = _one_view(weights) if None not in ids else None
                if joint is not None:
                    whole = _LazyTable(joint, joint.detach().float().clone())
                    lo = 0
                    for i, w in zip(ids, weights):
                        hi = lo + w.shape[0]
                        self.shadow[i] = whole.shadow[lo:hi]
                        self.lazy.append(
                            _LazyTable(self._live[i], self.shadow[i], whole.last[lo:hi])
                        )
                        lo = hi
                    starts = torch.tensor([0] + [w.shape[0] for w in weights[:-1]]).cumsum(0)
                    first_row = starts[torch.tensor(list(tbe.feature_table_map))]  # [F]
                    take = self._joint_take(whole, first_row.to(tbe.iter.device))
                else:
                    entries: list[_LazyTable | None] = []
                    for i in ids:
                        if i is not None:
                            self.shadow[i] = self._live[i].detach().float().clone()
                            self.lazy.append(_LazyTable(self._live[i], self.shadow[i]))
                        entries.append(self.lazy[-1] if i is not None else None)
                    feature_table = torch.tensor(list(tbe.feature_table_map), dtype=torch.int64,
                                                 device=tbe.iter.device)
                    take = self._lookup_take(entries, feature_table)
                lazy.update(i for i in ids if i is not None)
                self._handles.append(hook_training_lookups(tbe, take))
        return lazy

    def _joint_take(self, whole: _LazyTable, first_row: torch.Tensor) -> LookupHook:
        """The lookup hook of a kernel whose tables' averages are one buffer: an id of
        feature f is row ``first_row[f] + id`` of it (``first_row`` [F])."""

        def take(indices: torch.Tensor, offsets: torch.Tensor) -> None:
            indices, offsets = indices.to(torch.int64), offsets.to(torch.int64)
            with torch.autograd.profiler.record_function(PROFILE_LABEL):
                if first_row.numel() > 1:
                    # bags are feature-major, B per feature; sized from the shapes (no sync)
                    per_feature = (offsets.numel() - 1) // first_row.numel()
                    per_bag = first_row.repeat_interleave(per_feature)
                    indices = indices + per_bag.repeat_interleave(
                        offsets.diff(), output_size=indices.numel())
                self._catch_up_rows(whole, indices)

        return take

    def _lookup_take(self, entries: list[_LazyTable | None], feature_table: torch.Tensor
                     ) -> LookupHook:
        """The lookup hook of a kernel whose tables' averages are apart: each table's rows
        (another table's ids standing as its row 0, so no sync sizes them)."""
        def take(indices: torch.Tensor, offsets: torch.Tensor) -> None:
            with torch.autograd.profiler.record_function(PROFILE_LABEL):
                per_table = kernel_rows(feature_table, len(entries), indices, offsets)
                for entry, rows in zip(entries, per_table):
                    if entry is not None:
                        self._catch_up_rows(entry, rows)

        return take

    @torch.no_grad()
    def _catch_up_rows(self, entry: _LazyTable, rows: torch.Tensor) -> None:
        """The looked-up ``rows`` [N] (repeats allowed) caught up to ``num_updates`` with the
        weight they have had since their last change, before backward changes them; from
        this update on their average follows the weight after the step. A row caught up
        twice in one step gets a product of 1 (lerp returns its average bitwise). Sorted rows:
        memory touched in order (a write of 500k rows into a 1M x 64 table, one CPU thread:
        49 ms sorted, 209 ms in lookup order; docs/performance.md, "Weight average on a large
        table")."""
        rows = torch.sort(rows).values
        n = self.num_updates
        since = self._log_decays(entry.last.index_select(0, rows))
        prod = torch.exp(self._log_decays_at(n) - since)
        caught = torch.lerp(entry.weight.index_select(0, rows).float(),
                            entry.shadow.index_select(0, rows), prod.float().unsqueeze(1))
        entry.shadow.index_copy_(0, rows, caught)
        entry.last.index_fill_(0, rows, n)

    def _log_decays(self, k: torch.Tensor) -> torch.Tensor:
        """L(k) = sum_{t<k} log d_t, float64, for int64 ``k`` <= ``num_updates`` (any shape):
        looked up in a table of L(0..), extended (doubling) as the updates go on."""
        if self._log_table.numel() <= self.num_updates or self._log_table.device != k.device:
            size = max(1024, 2 * (self.num_updates + 1))
            kk = torch.arange(size, dtype=torch.int64, device=k.device)
            warm = kk.clamp(max=self._warm).double()
            self._log_table = (
                torch.lgamma(warm + 1.0) - torch.lgamma(warm + 10.0) + math.lgamma(10.0)
                + (kk - self._warm).clamp(min=0).double() * math.log(self.decay)
            )
        return self._log_table[k]

    def _log_decays_at(self, n: int) -> float:
        kk = min(n, self._warm)
        return (math.lgamma(kk + 1.0) - math.lgamma(kk + 10.0) + math.lgamma(10.0)
                + max(n - self._warm, 0) * math.log(self.decay))

    @torch.no_grad()
    def _catch_up(self, entry: _LazyTable) -> None:
        """Every row's average brought to ``num_updates`` updates, a chunk of rows at a time:
        avg <- w + exp(L(n) - L(last)) (avg - w)."""
        n = self.num_updates
        log_n = self._log_decays_at(n)
        for lo in range(0, entry.last.numel(), _SWAP_ROWS):
            hi = min(lo + _SWAP_ROWS, entry.last.numel())
            prod = torch.exp(log_n - self._log_decays(entry.last[lo:hi]))
            avg = entry.shadow[lo:hi]
            avg.copy_(torch.lerp(entry.weight[lo:hi].float(), avg, prod.float().unsqueeze(1)))
        entry.last.fill_(n)

    @torch.no_grad()
    def catch_up_all(self) -> None:
        """Every lazily averaged row up to date (before the average is read; nothing to do
        while it is swapped in: it was caught up then)."""
        if self._swapped_in_place or self._backup:
            return
        for entry in self.lazy:
            self._catch_up(entry)

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the average towards the weights (dense parameters
        and replicated tables every element; fused tables' rows were caught up when looked
        up and follow their new weight from this update on: nothing to do per row)."""
        t = self.num_updates
        weight = 1.0 - min(self.decay, (1.0 + t) / (10.0 + t))
        with torch.autograd.profiler.record_function(PROFILE_LABEL):
            if self._eager:
                shadows = [self.shadow[i] for i in self._eager]
                torch._foreach_lerp_(shadows, [self._live[i].float() for i in self._eager], weight)
        self.num_updates += 1

    @torch.no_grad()
    def restart(self) -> None:
        """Start over from the current weights (a resume from a checkpoint without one)."""
        for s, t in zip(self.shadow, self._live):
            s.copy_(t)
        self.num_updates = 0
        for entry in self.lazy:
            entry.last.zero_()

    def _synced_lazy(self) -> None:
        """After a load: every row's average is the loaded one, at ``num_updates``."""
        for entry in self.lazy:
            entry.last.fill_(self.num_updates)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the model's weights for the duration; the raw weights after.
        float32 weights exchange values with the average in place (no copy); a half-precision
        table's raw weights are copied aside."""
        self.catch_up_all()
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    @torch.no_grad()
    def _swap_in(self) -> None:
        for i, (t, s) in enumerate(zip(self._live, self.shadow)):
            if t.dtype == torch.float32:
                _swap_rows(t.data, s)
                self._swapped_in_place.add(i)
            else:
                self._backup[i] = t.detach().clone()
                t.copy_(s)
        self._sync_forward()

    @torch.no_grad()
    def _swap_out(self) -> None:
        for i, (t, s) in enumerate(zip(self._live, self.shadow)):
            if i in self._swapped_in_place:
                _swap_rows(t.data, s)
            else:
                t.copy_(self._backup.pop(i))
        self._swapped_in_place.clear()
        self._sync_forward()

    @torch.no_grad()
    def _sync_forward(self) -> None:
        """Half-precision dense parameters follow their (swapped) float32 masters."""
        for (_, master, forward) in self.dense:
            if forward is not None:
                forward.copy_(master)

    def _average(self, i: int) -> torch.Tensor:
        """Where the average of live tensor i is now (in the weight while swapped in place)."""
        return self._live[i] if i in self._swapped_in_place else self.shadow[i]

    # ------------------------------------------------------------------ checkpoints
    def dense_state(self) -> dict[str, Any]:
        """``{"ema": {child: {name: tensor}}, "ema_updates": n}`` for the dense file."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for i, ((child, name), _, _) in enumerate(self.dense):
            out.setdefault(child, {})[name] = self._average(i).detach().float().clone()
        return {"ema": out, "ema_updates": self.num_updates}

    @torch.no_grad()
    def load_dense_state(self, state: dict[str, Any], where: str) -> None:
        saved = state["ema"]
        for ((child, name), _, _), s in zip(self.dense, self.shadow):
            value = saved.get(child, {}).get(name)
            if value is None or value.shape != s.shape:
                raise CheckpointError(
                    f"checkpoint {where}: its weight average has no {child}.{name} of shape "
                    f"{tuple(s.shape)}"
                )
            s.copy_(value)
        self.num_updates = int(state["ema_updates"])
        self._synced_lazy()

    def table_state(self) -> dict[str, Any]:
        """Weight key -> the average, sharded like the weight (DCP saves it, or fills it)."""
        self.catch_up_all()  # read: every row up to date
        out = {}
        for key, (value, ts) in self.tables.items():
            averages = [self._average(i) for i in self._table_ids[key]]
            # float32 tables: the shadows themselves (a load fills them in place)
            parts = [a if t.dtype == torch.float32 else a.to(t.dtype) for a, t in zip(averages, ts)]
            out[key] = _like(value, parts)
        return out

    @torch.no_grad()
    def load_table_state(self, state: dict[str, Any]) -> None:
        """After DCP filled ``table_state()``'s values: into the shadows (a no-op for
        float32 tables, filled in place)."""
        for key, ids in self._table_ids.items():
            for i, part in zip(ids, state_tensors(state[key])):
                if part.data_ptr() != self.shadow[i].data_ptr():
                    self.shadow[i].copy_(part)
        self._synced_lazy()
