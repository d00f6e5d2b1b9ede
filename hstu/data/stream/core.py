"""What every stream source shares: its position, the windows it yields, the growing id maps.

Legend: E events in a window, K ids known to an id map.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hstu.data.errors import DataError


@dataclass(frozen=True, order=True)
class StreamPosition:
    """Where a stream stands: ``row`` rows of partition ``partition`` are consumed, and every
    partition whose name sorts before it. ``partition == ""`` is the start of the stream."""

    partition: str = ""
    row: int = 0

    @staticmethod
    def start() -> StreamPosition:
        """Before the first partition."""
        return StreamPosition("", 0)

    def to_dict(self) -> dict[str, Any]:
        return {"partition": self.partition, "row": self.row}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> StreamPosition:
        return StreamPosition(str(d["partition"]), int(d["row"]))


@dataclass(frozen=True)
class Lag:
    """How far a window is behind the newest data the source knows of."""

    events_waiting: int
    """Events of complete partitions not yet yielded (after this window)."""
    seconds_behind: float
    """Folder: seconds between the completion of this window's partition and of the newest
    complete partition (file times); replay: event time of the last event minus that of
    this window's last event."""


@dataclass
class Window:
    """A slice of the stream, in the stream's order. Legend: E events.

    user, item: int64 [E] dense ids (1..K, 0 stays free) from the source's id maps;
    timestamp: int64 [E] seconds; rating: float64 [E] or None (the partition has no rating
    column); raw_user, raw_item: [E] the ids as the input wrote them (int64, or str).
    """

    name: str
    position_before: StreamPosition
    position_after: StreamPosition
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray | None
    raw_user: np.ndarray
    raw_item: np.ndarray
    lag: Lag = field(default_factory=lambda: Lag(0, 0.0))
    new_users: int = 0
    """Users first seen in this window (their dense ids are the largest)."""
    new_items: int = 0
    """Items first seen in this window."""
    counts: dict[str, int] = field(default_factory=dict)
    """What the source did to the rows of this window's partition when it read them (a
    folder's partition: ``merged_files``, ``reordered_events``, ``duplicate_events``,
    ``read_retries``, see ``hstu.data.stream.folder.COUNTS``), on the partition's first window
    only (empty on the others), so a sum over windows counts each partition once."""

    @property
    def num_events(self) -> int:
        return len(self.user)

    def select(self, keep: np.ndarray) -> Window:
        """The window with the events where ``keep`` (bool [E]) is True, in order; its name,
        positions and lag unchanged."""
        return replace(
            self, user=self.user[keep], item=self.item[keep], timestamp=self.timestamp[keep],
            rating=None if self.rating is None else self.rating[keep],
            raw_user=self.raw_user[keep], raw_item=self.raw_item[keep],
        )

    @staticmethod
    def cut(
        name: str, first: int, whole: bool, users: IdMap, items: IdMap, raw_user: np.ndarray,
        raw_item: np.ndarray, timestamp: np.ndarray, rating: np.ndarray | None, lag: Lag,
        counts: dict[str, int] | None = None,
    ) -> Window:
        """Rows ``first`` .. ``first + E`` of the partition ``name`` (``whole``: all of it),
        their raw ids mapped through ``users`` / ``items`` (which grow); ``counts``: see
        :attr:`counts`."""
        last = first + len(raw_user)
        user, new_users = users.map(raw_user)
        item, new_items = items.map(raw_item)
        return Window(
            name=name if whole else f"{name}[{first}:{last}]",
            position_before=StreamPosition(name, first), position_after=StreamPosition(name, last),
            user=user, item=item, timestamp=timestamp, rating=rating, raw_user=raw_user,
            raw_item=raw_item, lag=lag, new_users=new_users, new_items=new_items,
            counts=dict(counts or {}),
        )


class StreamSource(Protocol):
    """A source of windows. ``windows(start)`` yields the stream from ``start`` on; after a
    window is yielded (and before the next is asked for) ``state_dict()`` is the source's
    state at that window's ``position_after``: save both with a checkpoint, restore with
    ``load_state_dict()`` and continue with ``windows(position_after)``."""

    users: IdMap
    items: IdMap

    def windows(self, start: StreamPosition = ...) -> Iterator[Window]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def lag(self) -> Lag: ...


# ----------------------------------------------------------------------------- id maps


def _as_keys(raw: np.ndarray, kind: str | None) -> tuple[np.ndarray, str]:
    """raw ids [E] -> (keys [E] int64 or numpy str, their kind "int" / "str").

    Integer ids stay integers unless the map already holds text (then "17" is their text);
    text ids in a map of integers are refused by the caller."""
    if raw.dtype.kind in "iu":
        keys = raw.astype(np.int64, copy=False)
        if kind == "str":
            return keys.astype(str), "str"
        return keys, "int"
    return np.asarray(raw, dtype=str), "str"


class IdMap:
    """Raw id -> dense id 1..K, growing: a raw id not seen before gets the next id, in the
    order of first appearance in the stream (so every rank reading the same stream builds the
    same map). Ids are integers or text; a map of integers refuses text ids.

    Memory: the keys in id order and sorted, and the ids of the sorted keys: 24 bytes per
    integer id.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.kind: str | None  # "int", "str" or None (an empty map)
        self._keys: np.ndarray  # [K] raw id of dense id k + 1
        self._sorted: np.ndarray  # [K] the keys sorted
        self._sorted_ids: np.ndarray  # [K] dense id of each sorted key
        self.load_state_dict({"kind": None, "keys": np.zeros(0, dtype=np.int64)})

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, raw: np.ndarray, where: str, field_name: str) -> None:
        """Raises DataError if ``raw`` cannot enter this map (text ids into integer ids)."""
        if self.kind == "int" and raw.dtype.kind not in "iu" and len(raw):
            raise DataError(
                where,
                f"{self.name} ids are text (e.g. {str(raw[0])[:40]!r}) but the stream's "
                f"{self.name} ids so far are integers",
                field=field_name,
            )

    def _find(self, uniq: np.ndarray) -> np.ndarray:
        """Dense ids int64 [U] of sorted distinct keys [U]; 0 where unknown (sorted queries:
        the binary searches walk the table in order)."""
        if not len(self._sorted) or not len(uniq):
            return np.zeros(len(uniq), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, uniq), len(self._sorted) - 1)
        return np.where(self._sorted[pos] == uniq, self._sorted_ids[pos], 0).astype(np.int64)

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        """Dense ids int64 [E] of ``raw`` [E]; 0 where unknown. The map does not grow."""
        if not len(self._keys) or not len(raw):
            return np.zeros(len(raw), dtype=np.int64)
        if self.kind == "int" and raw.dtype.kind not in "iu":
            return np.zeros(len(raw), dtype=np.int64)
        keys, _ = _as_keys(raw, self.kind)
        uniq, inverse = np.unique(keys, return_inverse=True)
        return self._find(uniq)[inverse.reshape(-1)]

    def map(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        """Dense ids int64 [E] of ``raw`` [E], adding the new ones; (ids, how many were new).

        Call :meth:`check` first: this one assumes the ids fit the map."""
        if not len(raw):
            return np.zeros(0, dtype=np.int64), 0
        keys, kind = _as_keys(raw, self.kind)
        if self.kind is None:
            self.kind = kind
            self._keys = self._keys.astype(keys.dtype)
            self._sorted = self._sorted.astype(keys.dtype)
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        ids = self._find(uniq)
        missing = np.flatnonzero(ids == 0)
        if len(missing):
            order = missing[np.argsort(first[missing], kind="stable")]  # first appearance
            new_keys = uniq[order]
            next_id = len(self._keys) + 1
            ids[order] = np.arange(next_id, next_id + len(order), dtype=np.int64)
            if self.kind == "str":  # numpy text arrays have a width: widen, never truncate
                wide = np.promote_types(self._sorted.dtype, uniq.dtype)
                self._sorted = self._sorted.astype(wide)
                self._keys = self._keys.astype(wide)
            self._keys = np.concatenate([self._keys, new_keys])
            new_sorted = uniq[missing]  # sorted, as uniq is
            at = np.searchsorted(self._sorted, new_sorted)
            self._sorted = np.insert(self._sorted, at, new_sorted)
            self._sorted_ids = np.insert(self._sorted_ids, at, ids[missing])
        return ids[inverse.reshape(-1)], len(missing)

    def raw(self, dense: np.ndarray) -> np.ndarray:
        """Raw ids [E] of dense ids [E] (each in 1..K)."""
        return self._keys[np.asarray(dense, dtype=np.int64) - 1]

    def state_dict(self) -> dict[str, Any]:
        """{"name", "kind", "keys": [K] raw ids in dense-id order} (a copy)."""
        return {"name": self.name, "kind": self.kind, "keys": self._keys.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = np.asarray(state["keys"])
        self.kind = state["kind"]
        self._keys = keys.copy()
        order = np.argsort(keys, kind="stable")
        self._sorted = keys[order]
        self._sorted_ids = order + 1  # argsort's indices are int64 (intp) on 64-bit hosts

    def truncate(self, size: int) -> None:
        """Forgets every id after the first ``size`` (the map as it was at that size)."""
        if size < len(self._keys):
            self.load_state_dict({"kind": self.kind if size else None, "keys": self._keys[:size]})

    def save(self, path: str | Path, start: int = 0) -> None:
        """Writes the keys to ``path`` (.npy) atomically (a temporary file, then a rename);
        from dense id ``start + 1`` on (the keys added since the map held ``start``)."""
        keys = self._keys[start:]
        if self.kind is None:
            keys = np.zeros(0, dtype=np.int64)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, keys, allow_pickle=False)

    def load(self, path: str | Path) -> None:
        keys = np.load(path, allow_pickle=False)
        if keys.ndim != 1:
            raise DataError(str(path), "holds ids keyed by hash, this run numbers its ids "
                            "(StreamArgs.ids): they cannot be mixed")
        kind = None if not len(keys) else ("int" if keys.dtype.kind in "iu" else "str")
        self.load_state_dict({"kind": kind, "keys": keys})

    def extend(self, path: str | Path) -> None:
        """Appends the keys of ``path`` (written by :meth:`save` with ``start = len(self)``)."""
        keys = np.load(path, allow_pickle=False)
        if not len(keys):
            return
        kind = "int" if keys.dtype.kind in "iu" else "str"
        if self.kind is not None and kind != self.kind:
            raise DataError(str(path), f"{kind} {self.name} ids, the map before holds {self.kind}")
        old = self._keys if self.kind is not None else np.zeros(0, keys.dtype)
        self.load_state_dict({"kind": kind, "keys": np.concatenate([old, keys])})


_TEXT_BASE = 1 << 62
"""Keys of text ids are in [2**62, 2**63): apart from integer ids' keys, which are in [1, 2**62)."""


def _text_keys(text: np.ndarray) -> np.ndarray:
    """int64 [E]: 2**62 + a 62-bit BLAKE2b hash of each text id (the same in every process)."""
    uniq, inverse = np.unique(np.asarray(text, dtype=str), return_inverse=True)
    digests = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 2
               for t in uniq.tolist()]
    return (np.asarray(digests, dtype=np.int64) + _TEXT_BASE)[inverse.reshape(-1)]


class HashedIds:
    """Raw id -> key, with no map to grow (StreamArgs.ids = "hashed"): an integer id r in
    [0, 2**62) is r + 1, a text id 2**62 + its 62-bit hash. Nothing is remembered per id, so
    memory does not grow with the ids seen; the keys go to dynamic tables (which bound their
    rows) and to the user store (sharded by key). ``keep_names``: remember the text of text
    keys (items, to answer in raw ids), pruned to the keys still in use with :meth:`prune`.

    Same interface as :class:`IdMap`; ``len()`` is 0 and no id is counted as new."""

    def __init__(self, name: str, keep_names: bool = False) -> None:
        self.name = name
        self.kind: str | None = None
        self.keep_names = keep_names
        self._names: dict[int, str] = {}

    def __len__(self) -> int:
        return 0

    def check(self, raw: np.ndarray, where: str, field_name: str) -> None:
        """Raises DataError if ``raw`` cannot be keyed: text into integer ids, or an integer
        outside [0, 2**62)."""
        if not len(raw):
            return
        if self.kind == "int" and raw.dtype.kind not in "iu":
            raise DataError(where, f"{self.name} ids are text (e.g. {str(raw[0])[:40]!r}) but the "
                            f"stream's {self.name} ids so far are integers", field=field_name)
        if raw.dtype.kind in "iu":
            bad = (raw < 0) | (raw >= _TEXT_BASE)
            if bad.any():
                raise DataError(where, f"{self.name} id {int(raw[bad][0])} is outside "
                                "[0, 2**62) (StreamArgs.ids = 'hashed')", field=field_name)

    def keys(self, raw: np.ndarray) -> np.ndarray:
        keys, kind = _as_keys(raw, self.kind)
        if kind == "int":
            return keys + 1
        out = _text_keys(keys)
        if self.keep_names:
            for k, t in zip(out.tolist(), np.asarray(keys).tolist()):
                self._names.setdefault(k, t)
        return out

    def map(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        if not len(raw):
            return np.zeros(0, dtype=np.int64), 0
        if self.kind is None:
            self.kind = "int" if raw.dtype.kind in "iu" else "str"
        return self.keys(raw), 0

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        if not len(raw) or (self.kind == "int" and raw.dtype.kind not in "iu"):
            return np.zeros(len(raw), dtype=np.int64)
        return self.keys(raw)

    def raw(self, keys: np.ndarray) -> np.ndarray:
        """Raw ids of keys (text: the remembered names; '' for a key not remembered)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.kind != "str":
            return keys - 1
        return np.asarray([self._names.get(int(k), "") for k in keys], dtype=str)

    def prune(self, keep: np.ndarray) -> None:
        """Forgets the names of keys not in ``keep`` (e.g. a dynamic table's live ids)."""
        live = set(np.asarray(keep, dtype=np.int64).tolist())
        self._names = {k: v for k, v in self._names.items() if k in live}

    def state_dict(self) -> dict[str, Any]:
        keys = np.fromiter(self._names, dtype=np.int64, count=len(self._names))
        names = np.asarray(list(self._names.values()), dtype=str)
        return {"name": self.name, "kind": self.kind, "hashed": True, "keys": keys,
                "names": names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kind = state["kind"]
        self._names = dict(zip(np.asarray(state["keys"]).astype(np.int64).tolist(),
                               np.asarray(state["names"]).astype(str).tolist()))

    def truncate(self, size: int) -> None:
        """Nothing to cut back (no id is numbered)."""

    def save(self, path: str | Path) -> None:
        """Writes the kind and the remembered names to ``path`` (.npy) atomically: a [N + 1, 2]
        text array, row 0 = ("hashed", kind)."""
        state = self.state_dict()
        rows = np.column_stack([state["keys"].astype(str), state["names"]]) if len(state["keys"]) \
            else np.zeros((0, 2), dtype=str)
        table = np.concatenate([np.asarray([["hashed", self.kind or ""]], dtype=str),
                                rows.astype(str)]).astype(str)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, table, allow_pickle=False)

    def load(self, path: str | Path) -> None:
        table = np.load(path, allow_pickle=False)
        if table.ndim != 2 or not len(table) or table[0, 0] != "hashed":
            raise DataError(str(path), "holds a map of numbered ids, this run keys its ids by hash "
                            "(StreamArgs.ids): they cannot be mixed")
        self.load_state_dict({"kind": str(table[0, 1]) or None, "keys": table[1:, 0],
                              "names": table[1:, 1]})


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """``with atomic_path(dest) as tmp:`` write ``tmp``; on success it is fsynced and renamed
    onto ``dest`` (readers see the old file or the new one, never half of one); on an error
    the temporary file is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


STATE_FILE = "stream.json"
USER_IDS_FILE = "user_ids.npy"
ITEM_IDS_FILE = "item_ids.npy"
USER_IDS_DELTA = "user_ids.delta.npy"
ITEM_IDS_DELTA = "item_ids.delta.npy"


def save_stream(directory: str | Path, position: StreamPosition, source: StreamSource,
                since: tuple[int, int] | None = None) -> list[str]:
    """Writes the stream's part of a checkpoint into ``directory``: the id maps
    (``user_ids.npy``, ``item_ids.npy``), then ``stream.json`` (the position, the source's
    small state and the id maps' sizes), each file atomically; returns the files' names.
    Call it between windows, with the last yielded window's ``position_after``.

    ``since`` (users, items): a delta of a checkpoint whose maps held that many ids: only the
    ids added since go into ``user_ids.delta.npy`` / ``item_ids.delta.npy`` (maps only
    grow), and ``stream.json`` records ``since`` (``delta_from``). Hashed ids
    (:class:`HashedIds`: no numbered map; the names of live text ids, bounded by the dynamic
    table) are written whole in a delta too, under the full file's name.

    A kill between the files leaves id maps newer than ``stream.json``: maps only grow, so
    :func:`load_stream` cuts them back to the sizes ``stream.json`` recorded."""
    directory = Path(directory)
    state = source.state_dict()
    names = []
    for k, (idmap, whole, delta) in enumerate(((source.users, USER_IDS_FILE, USER_IDS_DELTA),
                                               (source.items, ITEM_IDS_FILE, ITEM_IDS_DELTA))):
        if since is None or not isinstance(idmap, IdMap):
            idmap.save(directory / whole)
            names.append(whole)
        else:
            idmap.save(directory / delta, since[k])
            names.append(delta)
    small = {k: v for k, v in state.items() if k not in ("users", "items")}
    saved = {
        "position": position.to_dict(),
        "source": small,
        "num_users": len(source.users),
        "num_items": len(source.items),
    }
    if since is not None:
        saved["delta_from"] = {"num_users": int(since[0]), "num_items": int(since[1])}
    write_json_atomic(directory / STATE_FILE, saved)
    return [*names, STATE_FILE]


def _read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(str(path), f"cannot read the stream state ({exc})") from None


def _load_map(idmap: Any, path: Path, extend: bool = False) -> None:
    try:
        if extend:
            idmap.extend(path)
        else:
            idmap.load(path)
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(str(path), f"cannot read the stream's {idmap.name} id map "
                        f"({type(exc).__name__}: {exc})") from None


def load_id_maps(directory: str | Path, users: Any, items: Any,
                 links: list[str | Path] | tuple = ()) -> dict[str, Any]:
    """Fills the id maps ``users`` and ``items`` as a checkpoint written by
    :func:`save_stream` into ``directory`` holds them; returns its ``stream.json``. A delta
    checkpoint needs its ``links`` (the folders before it: its full checkpoint first, then
    the deltas in order): the maps are the full one's, extended by each delta's new ids in
    order (hashed ids: the last one's, whole)."""
    folders = [Path(p) for p in links] + [Path(directory)]
    saved = _read_state(folders[0])
    if "delta_from" in saved:
        raise DataError(str(folders[0] / STATE_FILE),
                        "a delta checkpoint: it is restored with the chain its online.json names")
    for idmap, file, key in ((users, USER_IDS_FILE, "num_users"),
                             (items, ITEM_IDS_FILE, "num_items")):
        _load_map(idmap, folders[0] / file)
        if len(idmap) < saved[key]:
            raise DataError(str(folders[0] / file),
                            f"holds {len(idmap)} ids, fewer than the {saved[key]} of {STATE_FILE}")
        idmap.truncate(saved[key])
    for folder in folders[1:]:
        saved = _read_state(folder)
        start = saved.get("delta_from")
        if start is None:
            raise DataError(str(folder / STATE_FILE), "a full checkpoint where the chain has a "
                            "delta")
        for idmap, whole, file, key in (
                (users, USER_IDS_FILE, USER_IDS_DELTA, "num_users"),
                (items, ITEM_IDS_FILE, ITEM_IDS_DELTA, "num_items")):
            if not isinstance(idmap, IdMap):  # hashed ids: whole in every checkpoint
                _load_map(idmap, folder / whole)
                continue
            if start[key] != len(idmap):
                raise DataError(str(folder / file),
                                f"adds ids after the first {start[key]}, the chain before it "
                                f"holds {len(idmap)}")
            _load_map(idmap, folder / file, extend=True)
            if len(idmap) < saved[key]:
                raise DataError(str(folder / file), f"holds {len(idmap) - start[key]} ids, "
                                f"fewer than the {saved[key] - start[key]} of {STATE_FILE}")
            idmap.truncate(saved[key])
    return saved


def load_stream(directory: str | Path, source: StreamSource,
                links: list[str | Path] | tuple = ()) -> StreamPosition:
    """Restores what :func:`save_stream` wrote into ``source``; returns the position to
    continue from (``source.windows(position)``). A delta checkpoint needs its ``links``
    (:func:`load_id_maps`)."""
    saved = load_id_maps(directory, source.users, source.items, links)
    state = dict(saved["source"])
    state["users"] = source.users.state_dict()
    state["items"] = source.items.state_dict()
    source.load_state_dict(state)
    return StreamPosition.from_dict(saved["position"])


__all__ = [
    "ITEM_IDS_DELTA",
    "ITEM_IDS_FILE",
    "STATE_FILE",
    "USER_IDS_DELTA",
    "USER_IDS_FILE",
    "HashedIds",
    "IdMap",
    "Lag",
    "StreamPosition",
    "StreamSource",
    "Window",
    "atomic_path",
    "load_id_maps",
    "load_stream",
    "save_stream",
    "write_json_atomic",
]
