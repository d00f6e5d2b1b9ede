"""The table rows changed since a checkpoint, and a checkpoint of those rows only (online
training's delta checkpoints; docs/online.md "Checkpoints: bases and deltas").

Legend: C[t] rows of table t, k rows of t touched since the last checkpoint, D[t] its dim.

:class:`TouchedRows` keeps, per table, a bool [C] of the rows the sparse optimizer may have
changed since the last checkpoint: every row looked up by a training step (the batch's
features after the input stage, noted on the host before the batch goes to a device) and the
rows a dynamic table (re)initialised for admitted ids. FBGEMM's fused optimizers and the
replicated tables' :class:`~hstu.embeddings.optim.RowSparseOptimizer` change the looked-up rows
only (weights and per-row state), so every other row is bitwise what the last checkpoint holds.
A dynamic table's per-row state (:data:`SLOT_BUFFERS`: which id a row holds, its last use)
is written as rows too: it changes on the rows looked up, the rows admitted (both noted) and
the rows freed by expiry (found by comparing the occupied rows with those of the last
checkpoint); an evicted row is always admitted again in the same step. A freed row's weights
keep their values until an admission writes them, which is noted. A rank notes its own
batches; the union over the ranks is taken when a checkpoint is written
(:meth:`TouchedRows.union`, one host all-reduce).

:func:`touched_entries` takes those rows out of the tables' entries of
:func:`hstu.embeddings.embedding_state_dict` (:func:`row_keys`: weights, fused optimizer state,
replicated tables and their optimizer state, the dynamic tables' per-row state): per key, the
global row indices [k'] and the values [k', ...] of the rows this rank holds, each row written
once (a sharded table's by the rank whose shard holds it, a replicated table's by rank 0).
:func:`apply_entries` writes such entries into a state of any sharding and world size: each
rank keeps the rows that fall in its pieces.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.embeddings.collection import HstuEmbeddings
from hstu.sync_audit import allowed_sync

HOST_ROWS = "row deltas: the batch's ids are noted on the host, before the copy to a device"

SLOT_BUFFERS = ("slot_ids", "occupied", "last_access", "access_count", "last_time")
"""A dynamic table's per-row state (:class:`hstu.embeddings.dynamic.DynamicIdRemapper`, one
value per row of its table): written as rows like the table's weights. Its other state (counts,
the step, the clock) is small and stays whole in every checkpoint."""

Entries = dict[str, dict[str, torch.Tensor]]
"""state key -> {"rows": int64 [k'] global rows, "values": [k', ...]} or {"whole": tensor}
(a per-table scalar, e.g. the replicated tables' Adam step)."""


def _modules(model: nn.Module) -> list[tuple[str, HstuEmbeddings]]:
    """(key prefix, module) of every HstuEmbeddings, as embedding_state_dict names them."""
    return [(n + "." if n else "", m) for n, m in model.named_modules()
            if isinstance(m, HstuEmbeddings)]


def table_rows(model: nn.Module) -> dict[str, int]:
    """Table id (key prefix + table name) -> C, for every table of ``model``."""
    return {prefix + name: spec.num_rows for prefix, emb in _modules(model)
            for name, spec in emb.specs.items()}


def row_keys(model: nn.Module, state: dict[str, Any]) -> dict[str, str]:
    """The keys of ``state`` (an embedding_state_dict) that hold table rows -> their table id."""
    out: dict[str, str] = {}
    for prefix, emb in _modules(model):
        for table in emb.specs:
            starts = (f"{prefix}tables.embeddings.{table}.weight",
                      f"{prefix}dp_tables.embeddings.{table}.weight",
                      f"{prefix}optim.embeddings.{table}.weight.",
                      f"{prefix}dense_optim.{table}.")
            out.update({k: prefix + table for k in state
                        if k in starts[:2] or k.startswith(starts[2:])})
        for table in emb.remappers:
            out.update({key: prefix + table for key in (
                f"{prefix}remappers.{table}.{buf}" for buf in SLOT_BUFFERS) if key in state})
    return out


class TouchedRows:
    """Per table of ``model``, a bool [C] of the rows touched since :meth:`clear` (host
    memory, C bytes per table)."""

    def __init__(self, model: nn.Module) -> None:
        self.num_rows = table_rows(model)
        self.masks = {t: torch.zeros(c, dtype=torch.bool) for t, c in self.num_rows.items()}
        self._feature_table = {f: prefix + s.name for prefix, emb in _modules(model)
                               for s in emb.specs.values() for f in s.feature_names}
        self.problem: str | None = None
        """Why the rows noted cannot be trusted (then the tables are written whole)."""
        self._remappers = {prefix + table: remapper for prefix, emb in _modules(model)
                           for table, remapper in emb.remappers.items()}
        self._occupied = {t: r.occupied.clone() for t, r in self._remappers.items()}
        """Each dynamic table's occupied rows at the last checkpoint (or at construction,
        which may be before a resume's load: the rows that differ are then written too)."""
        for prefix, emb in _modules(model):
            emb.rows_written = lambda table, slots, p=prefix: self.note_rows(p + table, slots)

    def note(self, features: KeyedJaggedTensor) -> None:
        """The rows a training step looks up: ``features`` as the tables receive them (after
        the input stage's remap), still on the host."""
        values = features.values()
        if values.device.type != "cpu":  # reading it would wait for the device
            self.problem = "a training batch reached the tables on the device, not noted"
            return
        with allowed_sync(HOST_ROWS):
            offsets = features.offset_per_key()
            for i, key in enumerate(features.keys()):
                table = self._feature_table.get(key)
                if table is not None and offsets[i + 1] > offsets[i]:
                    self.note_rows(table, values[offsets[i]:offsets[i + 1]])

    def note_rows(self, table: str, rows: torch.Tensor) -> None:
        """Rows of ``table`` (int64 global rows, on the host) changed by a step or a write."""
        if rows.device.type != "cpu":  # (a dynamic table's slots are host tensors)
            self.problem = f"rows of table {table} were written from the device, not noted"
            return
        mask = self.masks[table]
        with allowed_sync(HOST_ROWS):
            rows = rows.to(torch.int64)
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= mask.numel()):
                self.problem = f"a row outside table {table} [0, {mask.numel()}) was looked up"
                return
            mask[rows] = True

    def union(self) -> tuple[dict[str, torch.Tensor], str | None]:
        """Collective (default group, host tensors): per table the rows any rank touched
        (int64, ascending), and the first rank's problem (None: the rows are exact)."""
        for table, remapper in self._remappers.items():  # rows freed by expiry (host state)
            self.masks[table] |= remapper.occupied != self._occupied[table]
        names = sorted(self.masks)
        flat = torch.cat([self.masks[n].to(torch.uint8) for n in names])
        problems = [self.problem]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX)
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, self.problem)
        problem = next((p for p in problems if p is not None), None)
        out, start = {}, 0
        for n in names:
            size = self.masks[n].numel()
            out[n] = torch.nonzero(flat[start:start + size]).flatten()
            start += size
        return out, problem

    def clear(self) -> None:
        """A checkpoint was written: its state is what the next delta builds on."""
        for mask in self.masks.values():
            mask.zero_()
        for table, remapper in self._remappers.items():
            self._occupied[table].copy_(remapper.occupied)
        self.problem = None


def _pieces(value: Any) -> list[tuple[torch.Tensor, list[int]]] | None:
    """(local tensor, global offsets) of a ShardedTensor's local shards; None for a plain
    tensor (held whole by every rank)."""
    if hasattr(value, "local_shards"):
        return [(s.tensor, list(s.metadata.shard_offsets)) for s in value.local_shards()]
    return None


def _global_shape(value: Any) -> tuple[int, ...]:
    return tuple(value.size()) if hasattr(value, "local_shards") else tuple(value.shape)


@torch.no_grad()
def touched_entries(
    state: dict[str, Any], keys: dict[str, str], num_rows: dict[str, int],
    touched: dict[str, torch.Tensor], rank: int,
) -> tuple[Entries, str | None]:
    """This rank's entries of ``touched`` rows (module docstring) from ``state``'s ``keys``
    (:func:`row_keys`), or the reason they cannot be written as rows (then nothing).

    A read of the rows from the device: call it when a checkpoint is written only."""
    out: Entries = {}
    for key, table in sorted(keys.items()):
        value = state[key]
        shape, rows = _global_shape(value), touched[table]
        if len(shape) == 0:  # a per-table count (the replicated tables' step)
            if _pieces(value) is not None:
                return {}, f"{key} is a sharded scalar"
            if rank == 0:
                out[key] = {"whole": value.detach().cpu().clone()}
            continue
        if shape[0] != num_rows[table]:
            return {}, (f"{key} holds {list(shape)} values, not one per row of the "
                        f"{num_rows[table]} of {table}")
        pieces = _pieces(value)
        if pieces is None:  # replicated (or unsharded): rank 0 writes the rows
            if rank == 0:
                out[key] = {"rows": rows.clone(), "values": value.index_select(
                    0, rows.to(value.device)).cpu()}
            continue
        parts_rows, parts_values = [], []
        for local, offsets in pieces:
            if len(shape) > 1 and (offsets[1] != 0 or local.shape[1] != shape[1]):
                return {}, f"{key} is sharded by columns (column_wise)"
            lo, hi = offsets[0], offsets[0] + local.shape[0]
            a, b = torch.searchsorted(rows, torch.tensor([lo, hi])).tolist()
            mine = rows[a:b]
            parts_rows.append(mine)
            parts_values.append(local.index_select(0, (mine - lo).to(local.device)).cpu())
        if parts_rows:
            out[key] = {"rows": torch.cat(parts_rows), "values": torch.cat(parts_values)}
        else:  # this rank holds none of the table: the key, with no rows
            out[key] = {"rows": rows[:0], "values": torch.zeros((0, *shape[1:]))}
    return out, None


def whole_bytes(state: dict[str, Any], keys: dict[str, str], rank: int) -> int:
    """The bytes this rank would write of ``keys`` whole (its shards; a replicated value on
    rank 0), to weigh against :func:`entries_bytes` of the same keys."""
    total = 0
    for key in keys:
        pieces = _pieces(state[key])
        if pieces is None:
            if rank == 0:
                total += state[key].numel() * state[key].element_size()
            continue
        total += sum(local.numel() * local.element_size() for local, _ in pieces)
    return total


def entries_bytes(entries: Entries) -> int:
    return sum(t.numel() * t.element_size() for e in entries.values() for t in e.values())


@torch.no_grad()
def apply_entries(state: dict[str, Any], entries: Entries) -> None:
    """Writes ``entries`` (one rank's file of a delta; global rows) into what this rank holds
    of ``state``: the rows of its local shards, the whole of a plain tensor. Keys of
    ``entries`` that ``state`` does not hold are skipped (a rank without a shard of a table
    has no optimizer state of it; the caller checks the keys of all ranks)."""
    for key, entry in entries.items():
        if key not in state:
            continue
        value = state[key]
        if "whole" in entry:
            value.copy_(entry["whole"])
            continue
        rows, values = entry["rows"], entry["values"]
        pieces = _pieces(value) or [(value, [0] * value.dim())]
        for local, offsets in pieces:
            lo = offsets[0]
            inside = (rows >= lo) & (rows < lo + local.shape[0])
            if not bool(inside.any()):
                continue
            part = values[inside]
            if local.dim() > 1:  # this piece's columns (a column_wise shard)
                part = part[:, offsets[1]:offsets[1] + local.shape[1]]
            local.index_copy_(0, (rows[inside] - lo).to(local.device),
                              part.to(local.device, local.dtype))


__all__ = [
    "Entries",
    "TouchedRows",
    "apply_entries",
    "entries_bytes",
    "row_keys",
    "table_rows",
    "touched_entries",
    "whole_bytes",
]
