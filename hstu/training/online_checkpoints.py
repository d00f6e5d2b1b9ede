"""Online checkpoints as full bases and deltas (docs/online.md "Checkpoints: bases and deltas").

A full checkpoint holds every rank's user store snapshot, the whole id maps and the whole
embedding tables; a delta holds what changed since the checkpoint before it: the rows of the
users written since and the users deleted since
(:meth:`hstu.data.user_store.UserStore.checkpoint_delta`), the ids added since
(:func:`hstu.data.stream.save_stream` with ``since``) and, with ``StreamArgs.table_row_deltas``,
the table rows touched since (weights and per-row optimizer state, each rank the rows of its
shards: :mod:`hstu.embeddings.row_deltas`, ``table_rows.rank<r>.pt``). Every
``StreamArgs.full_checkpoint_every``-th checkpoint is a full base, and the next one after a
file named ``full_checkpoint`` appears in the checkpoint root. A delta's tables are whole
instead where rows would not be exact (``TrainerArgs.ema_decay``, a full-corpus loss, a
column-wise table; said once). The dense weights, dense optimizer, RNG streams and the dynamic
tables' remapper state are whole in every checkpoint (the trainer's files).

A row delta is restored from its chain's newest whole tables with each delta's rows written on
them in order (:func:`hstu.training.checkpoint_manager.load_tables`; global row indices, any
world size and sharding).

A delta names its chain in ``online.json`` (``checkpoint.chain``: the folders before it, its
base first) and in its manifest (``needs``, with each link's manifest CRC32): the lifecycle
(:mod:`hstu.training.lifecycle`) keeps the links of every kept checkpoint and refuses (or, with
``"auto"``, skips) a checkpoint whose chain is broken.

All methods are collective (every rank calls them in the same order).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hstu.data.stream import StreamPosition, save_stream
from hstu.data.user_store import UserStore
from hstu.embeddings.row_deltas import (
    TouchedRows,
    entries_bytes,
    row_keys,
    table_rows,
    touched_entries,
    whole_bytes,
)
from hstu.training import checkpoint as ckpt
from hstu.training.distributed import broadcast_object, gather_objects

FULL_REQUEST = "full_checkpoint"
"""A file of this name in the checkpoint root: the next checkpoint is a full base (the file
is removed once it is written)."""
CHAIN_KEY = "checkpoint"
"""online.json's entry: {"kind": "full" | "delta", "base": name, "chain": [names]}."""
STREAM_FILE_PREFIXES = ("user_store", "user_ids", "item_ids", "stream.json", "online.json")
TABLE_FILE_SUFFIXES = (".distcp", ".metadata")
"""The DCP files (tables whole, the remappers' buffers); a row delta's rows: ckpt.ROWS_PREFIX."""


@dataclass
class Plan:
    """The kind of the checkpoint being written: full, or a delta on ``chain`` (the folder
    names before it, its base first) with their manifests' CRC32 (``needs``)."""

    full: bool
    chain: list[str] = field(default_factory=list)
    needs: dict[str, int] | None = None
    requested: bool = False
    """A full one asked for by the FULL_REQUEST file."""
    why: str = ""


def chain_links(loaded: str) -> list[str]:
    """The folders a checkpoint is restored with before itself (base first; [] for a full
    one), from its online.json."""
    path = Path(loaded) / "online.json"
    info = json.loads(path.read_text()).get(CHAIN_KEY) or {}
    return [str(Path(loaded).parent / name) for name in info.get("chain", [])]


class StreamCheckpoints:
    """Decides full or delta for each online checkpoint, writes the stream's files of it,
    and measures it (bytes, seconds: the log line and the ``stream`` rows)."""

    def __init__(self, every: int, root: str, rank: int, log: Any) -> None:
        self.every, self.root, self.rank, self.log = every, root, rank, log
        self.parent: str | None = None
        """The last checkpoint saved or resumed from: the next delta's base or link."""
        self.parent_chain: list[str] = []
        self.since = (0, 0)
        """Rank 0: the id maps' sizes (users, items) at ``parent``."""
        self.plan = Plan(full=True)
        self.rows: TouchedRows | None = None
        """The table rows touched since ``parent`` (None: tables whole in every checkpoint)."""
        self.num_rows: dict[str, int] = {}
        self.written: dict[str, int] | None = None
        """Rows of each table the checkpoint being written holds (None: all, whole tables)."""
        self.tables_whole = "StreamArgs.table_row_deltas=False"
        """Why the tables are whole in every checkpoint ("": row deltas)."""
        self._said: set[str] = set()

    def track_rows(self, model: Any, row_deltas: bool, ema: bool) -> TouchedRows | None:
        """Starts noting the table rows each training step touches (the tracker; its
        ``note`` takes each training batch after the input stage), unless the tables must be
        whole in every checkpoint (the reason logged once at the first delta)."""
        self.num_rows = table_rows(model)
        if self.every == 1:
            return None
        why = ""
        if not row_deltas:
            why = "StreamArgs.table_row_deltas=False"
        elif ema:  # the average moves every row at every step
            why = "TrainerArgs.ema_decay averages every table row at every step"
        elif getattr(model.dense_module, "scores_corpus", False):
            why = 'negative_sampling="full_corpus" updates every item row at every step'
        self.tables_whole = why
        self.rows = None if why else TouchedRows(model)
        return self.rows

    def write_rows(self, manager: Any) -> None:
        """Collective, before a delta is written: the rows touched since ``parent`` of this
        rank's shards into ``manager.table_rows`` (the tables whole instead, saying once why,
        when they cannot be written as rows)."""
        manager.table_rows, self.written = None, None
        if self.plan.full:
            return
        why = self.tables_whole
        if self.rows is not None:
            touched, why = self.rows.union()
            if why is None:
                state = manager.tables.state_dict(with_ema=False)[manager.tables.KEY]
                keys = row_keys(manager.tables.model, state)
                entries, why = touched_entries(state, keys, self.num_rows, touched, self.rank)
                sizes = gather_objects((why, entries_bytes(entries),
                                        whole_bytes(state, keys, self.rank)))
                problems = [p for p, _, _ in sizes if p is not None]
                why = problems[0] if problems else None
                if why is None and sum(r for _, r, _ in sizes) >= sum(w for _, _, w in sizes):
                    why = ("a delta whose touched rows, with their row indices, would outweigh "
                           "the tables is written with the tables whole (most rows changed)")
                if why is None:
                    manager.table_rows = entries
                    self.written = {t: int(r.numel()) for t, r in touched.items()}
        if why and why not in self._said and self.rank == 0:
            self._said.add(why)
            self.log(f"[hstu] delta checkpoints hold the embedding tables whole: {why}")

    def resumed(self, loaded: str, links: list[str], source: Any) -> None:
        """A resume from ``loaded`` (restored with ``links``): the next delta builds on it."""
        self.parent = loaded
        self.parent_chain = [os.path.basename(p) for p in links]
        if source is not None:
            self.since = (len(source.users), len(source.items))

    def decide(self, step: int) -> Plan:
        """The plan of the checkpoint of ``step`` (collective: rank 0 decides)."""
        plan = None
        if self.rank == 0:
            plan = self._decide(step)
        self.plan = broadcast_object(plan)
        return self.plan

    def _decide(self, step: int) -> Plan:
        name = f"iter_{step}"
        requested = os.path.exists(os.path.join(self.root, FULL_REQUEST))
        parent = self.parent
        why = ""
        if self.every == 1:
            why = "StreamArgs.full_checkpoint_every=1"
        elif parent is None:
            why = "the first of the run"
        elif requested:
            why = f"asked for by {os.path.join(self.root, FULL_REQUEST)}"
        elif os.path.realpath(os.path.dirname(parent)) != os.path.realpath(self.root):
            why = f"the checkpoint before it is in another folder ({parent})"
        elif name == os.path.basename(parent) or name in self.parent_chain:
            why = f"{name} is saved again (same step): its chain would hold itself"
        elif len(self.parent_chain) + 1 >= self.every:
            why = f"a base every {self.every} checkpoints (StreamArgs.full_checkpoint_every)"
        elif ckpt.manifest_of(parent) is None:
            why = f"the checkpoint before it ({parent}) is gone"
        if why:
            return Plan(full=True, requested=requested, why=why)
        chain = [*self.parent_chain, os.path.basename(parent)]
        needs = {n: ckpt.manifest_crc(os.path.join(self.root, n)) for n in chain}
        return Plan(full=False, chain=chain, needs=needs)

    def info(self) -> dict[str, Any]:
        """online.json's CHAIN_KEY entry of the checkpoint being written."""
        plan = self.plan
        return {"kind": "full" if plan.full else "delta",
                "base": plan.chain[0] if plan.chain else None, "chain": list(plan.chain)}

    def write_store(self, folder: str, store: UserStore) -> list[str]:
        """This rank's user store part: the snapshot, or the delta since ``parent``."""
        path = store.checkpoint(folder) if self.plan.full else store.checkpoint_delta(folder)
        return [path.name]

    def write_stream(self, folder: str, position: StreamPosition, source: Any) -> list[str]:
        """Rank 0: the id maps (whole, or the ids added since ``parent``) and stream.json."""
        return save_stream(folder, position, source, None if self.plan.full else self.since)

    def saved(self, path: str, seconds: float, store: UserStore, source: Any,
              manager: Any) -> dict[str, float]:
        """After the checkpoint ``path`` is published: the store's changes and the touched
        rows are cleared, the next delta builds on it; logs one line and returns its
        ``stream`` rows."""
        plan = self.plan
        store.clear_changes()
        if self.rows is not None:
            self.rows.clear()
        manager.table_rows = None
        self.parent, self.parent_chain = path, list(plan.chain)
        if source is not None:
            self.since = (len(source.users), len(source.items))
        manifest = ckpt.manifest_of(path) or {"files": {}}
        sizes = {n: int(f["size"]) for n, f in manifest["files"].items()}
        total = sum(sizes.values()) + len(json.dumps(manifest))
        stream = sum(v for n, v in sizes.items() if n.startswith(STREAM_FILE_PREFIXES))
        tables = sum(v for n, v in sizes.items()
                     if n.endswith(TABLE_FILE_SUFFIXES) or n.startswith(ckpt.ROWS_PREFIX))
        written = self.written if self.written is not None else self.num_rows
        rows = {t.rsplit(".", 1)[-1]: n for t, n in sorted(written.items())}
        if self.rank == 0:
            if plan.full and plan.requested:
                Path(self.root, FULL_REQUEST).unlink(missing_ok=True)
            kind = (f"full ({plan.why})" if plan.full else
                    f"delta {len(plan.chain)} on base {plan.chain[0]}")
            held = "whole" if self.written is None else "rows " + ", ".join(
                f"{t.rsplit('.', 1)[-1]} {n} of {self.num_rows[t]}"
                for t, n in sorted(written.items()))
            self.log(f"[hstu] checkpoint {os.path.basename(path)}: {kind}, {_size(total)} "
                     f"(stream files {_size(stream)}, tables {_size(tables)} {held}) in "
                     f"{seconds:.2f} s")
        self.written = None
        return {"checkpoint_full": float(plan.full), "checkpoint_chain": float(len(plan.chain)),
                "checkpoint_bytes": float(total), "checkpoint_stream_bytes": float(stream),
                "checkpoint_table_bytes": float(tables), "checkpoint_seconds": float(seconds),
                **{f"checkpoint_rows_{t}": float(n) for t, n in rows.items()}}


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


__all__ = ["CHAIN_KEY", "FULL_REQUEST", "Plan", "StreamCheckpoints", "chain_links"]
