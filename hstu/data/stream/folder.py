"""A stream folder that partitions land in (docs/online.md "The stream folder").

    <stream>/
        2024-05-01T00/            one folder per partition; name order = time order
            part-0000.csv         .csv/.tsv/.txt, .jsonl/.json/.ndjson or .parquet (optionally .gz)
            part-0001.parquet     rows: user_id, item_id, timestamp[, rating] (own-data columns)
            _SUCCESS              empty; the partition counts once it is there
        2024-05-01T01/ ...
        _quarantine/              bad partitions, moved here with a _REASON file
        .staging-xyz/             names starting with "." or "_" are never read

Partitions are read whole, checked, then cut into windows (all of a partition, or
``max_window_events`` each). Every bad partition costs one log line naming it (and the file
and line where there is one), is moved into the quarantine with a ``_REASON`` file, and the
stream goes on; nothing is lost and nothing is yielded twice (the ledger of consumed
partitions is part of :meth:`FolderStream.state_dict`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hstu.columns import EVENT_COLUMNS
from hstu.data.custom import file_kind, read_custom_file
from hstu.data.data_args import CustomDataArgs, StreamArgs
from hstu.data.errors import DataError
from hstu.data.parsing import Columns
from hstu.data.stream.core import IdMap, Lag, StreamPosition, Window

logger = logging.getLogger("hstu.data.stream")

SUCCESS = "_SUCCESS"
"""The completion marker: a partition counts once this (empty) file is in it."""
REASON = "_REASON"
"""The text file beside a quarantined partition's files: why it was set aside (one line)."""
QUARANTINE = "_quarantine"
"""The default quarantine folder, inside the stream folder."""

Stop = threading.Event | Callable[[], bool] | None


def hidden(name: str) -> bool:
    """Names a writer uses while writing (``.staging``, ``_temporary``) and markers."""
    return name.startswith((".", "_"))


@dataclass
class Quarantined:
    """A partition set aside: its name, where it went, why."""

    partition: str
    moved_to: Path
    reason: str


@dataclass
class _Partition:
    name: str
    path: Path
    complete: bool
    done_time: float
    """When it completed: the modification time of _SUCCESS (or of the folder)."""


@dataclass
class _Consumed:
    digest: str | None
    """Content hash (None: no data, or consumed before this ledger was kept)."""
    rows: int
    """Its rows (-1: not known)."""
    signature: tuple | None = None
    """(inode, mtime) of the folder and of _SUCCESS when last looked at: a change makes the
    content be hashed again."""


@dataclass
class _Loaded:
    """A partition read and checked. Legend: R rows."""

    name: str
    done_time: float
    digest: str | None
    user: np.ndarray  # [R] raw ids (int64 or str)
    item: np.ndarray  # [R]
    seconds: np.ndarray  # [R] int64
    rating: np.ndarray | None  # [R] float64

    @property
    def rows(self) -> int:
        return len(self.user)


def _signature(path: Path) -> tuple:
    st = path.stat()
    try:
        marker = (path / SUCCESS).stat().st_mtime_ns
    except FileNotFoundError:
        marker = 0
    return (st.st_ino, st.st_mtime_ns, marker)


def _data_files(path: Path) -> list[Path]:
    """The data files of a partition in name order; a file or folder of another kind is an
    error (a partition holds data files and markers only)."""
    files = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if hidden(entry.name):
            continue
        if entry.is_dir():
            raise DataError(
                str(entry), "a folder inside a partition (a partition holds data files)"
            )
        if file_kind(entry) not in ("text", "json", "parquet"):
            raise DataError(
                str(entry),
                "not a data file: name it .csv, .tsv, .txt, .jsonl, .json, .ndjson or .parquet "
                "(optionally .gz), or start its name with '_' or '.' to have it ignored",
            )
        files.append(entry)
    return files


def partition_digest(path: Path) -> str | None:
    """Content hash of a partition: the sorted hashes of its data files (so the same data
    under other file names hashes the same); None when it holds no data."""
    digests = sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in _data_files(path)
                     if f.stat().st_size)
    if not digests:
        return None
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _count_rows(path: Path) -> int:
    """Rows of a complete partition without parsing it (parquet metadata; lines of text)."""
    rows = 0
    for f in _data_files(path):
        kind = file_kind(f)
        if kind == "parquet" and not f.name.lower().endswith(".gz"):
            rows += pq.ParquetFile(f).metadata.num_rows
            continue
        raw = f.read_bytes()
        if f.name.lower().endswith(".gz"):
            import gzip

            raw = gzip.decompress(raw)
        lines = sum(1 for line in raw.split(b"\n") if line.strip())
        rows += lines - (1 if kind == "text" and lines else 0)
    return rows


# StreamArgs fields passed to FolderStream as the keywords of the same name, and the own-data
# column names a stream keeps (its timestamp unit and rating column are StreamArgs')
_STREAM_KEYWORDS = (
    "follow", "poll_seconds", "idle_timeout_seconds", "incomplete_timeout_seconds",
    "require_success", "quarantine_dir", "max_window_events", "extra_columns",
)
_OWN_DATA_COLUMNS = ("user_column", "item_column", "timestamp_column", "delimiter")


class FolderStream:
    """Windows of a stream folder, partitions in name order (see the module docstring).

    Args:
        path: the stream folder.
        follow: wait for new partitions (polling) until ``stop`` or the idle timeout.
        poll_seconds: how often the folder is listed while waiting.
        idle_timeout_seconds: with follow, stop after this long without a new window (None:
            only ``stop`` ends it).
        incomplete_timeout_seconds: a partition without _SUCCESS while a newer one is
            complete is set aside after this long.
        require_success: a partition counts once _SUCCESS is in it; False: once visible.
        quarantine_dir: where bad partitions go (default ``<path>/_quarantine``).
        max_window_events: cut partitions into windows of at most this many events.
        columns: the column mapping (CustomDataArgs: user/item/timestamp column names,
            delimiter, timestamp_unit; action_column is the optional rating column).
        extra_columns: columns a partition may hold that are not read.
        stop: a threading.Event or a callable; once set / true, ``windows`` returns at the
            next window or poll.
        clock: the time source (tests pass a fast one).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        follow: bool = False,
        poll_seconds: float = 5.0,
        idle_timeout_seconds: float | None = None,
        incomplete_timeout_seconds: float = 600.0,
        require_success: bool = True,
        quarantine_dir: str | Path | None = None,
        max_window_events: int | None = None,
        columns: CustomDataArgs | None = None,
        extra_columns: tuple[str, ...] | list[str] = (),
        stop: Stop = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(str(self.path), "no such stream folder")
        self.follow = follow
        self.poll_seconds = poll_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self.incomplete_timeout_seconds = incomplete_timeout_seconds
        self.require_success = require_success
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else self.path / QUARANTINE
        self.max_window_events = max_window_events
        self.columns = columns or CustomDataArgs(action_column="rating")
        self.extra_columns = tuple(extra_columns)
        self.stop = stop
        self.clock = clock
        self.users = IdMap("user")
        self.items = IdMap("item")
        self.quarantined: list[Quarantined] = []
        """Partitions this object set aside, in order."""
        self._ledger: dict[str, _Consumed] = {}
        self._digests: dict[str, str] = {}  # content hash -> partition name
        # pending partition -> (signature, rows)
        self._rows_cache: dict[str, tuple[tuple, int]] = {}
        self._blocked: dict[str, float] = {}  # incomplete partition -> when first seen blocking
        self._pos = StreamPosition.start()  # how far the stream has read
        self._lag = Lag(0, 0.0)

    @classmethod
    def from_args(cls, args: StreamArgs, stop: Stop = None,
                  columns: CustomDataArgs | None = None) -> FolderStream:
        """The stream folder of StreamArgs (columns: names other than the own-data defaults)."""
        assert args.path is not None, "StreamArgs.path is not set"
        base = columns or CustomDataArgs()
        cols = CustomDataArgs(
            timestamp_unit=args.timestamp_unit,
            action_column=args.rating_column,
            **{name: getattr(base, name) for name in _OWN_DATA_COLUMNS},
        )
        return cls(args.path, columns=cols, stop=stop,
                   **{name: getattr(args, name) for name in _STREAM_KEYWORDS})

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Id maps and the ledger of consumed partitions, as of the last window yielded (the
        ledger may also hold empty partitions consumed since: they have nothing to yield)."""
        return {
            "users": self.users.state_dict(),
            "items": self.items.state_dict(),
            "consumed": [[name, c.digest, c.rows] for name, c in sorted(self._ledger.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.users.load_state_dict(state["users"])
        self.items.load_state_dict(state["items"])
        self._ledger = {
            name: _Consumed(digest, int(rows)) for name, digest, rows in state["consumed"]
        }
        self._digests = {c.digest: name for name, c in self._ledger.items() if c.digest}

    def lag(self) -> Lag:
        """The lag of the last window yielded."""
        return self._lag

    def first_consumed(self) -> list[str] | None:
        """[name, content hash] of the first partition (in name order) consumed with data: how
        a checkpoint recognises its stream (None before any)."""
        for name in sorted(self._ledger):
            digest = self._ledger[name].digest
            if digest is not None:
                return [name, digest]
        return None

    # ------------------------------------------------------------------ the stream

    def windows(self, start: StreamPosition = StreamPosition.start(),  # noqa: B008
                ) -> Iterator[Window]:
        """Windows from ``start`` on (see the class docstring for when it returns)."""
        self._pos = start
        if start.partition and not self._ledger:
            self._take_as_consumed(start)
        if start.row > 0:
            yield from self._resume(start)
        last_progress = self.clock()
        while not self._stopped():
            pending = self._scan()
            nxt = pending[0] if pending else None
            if nxt is not None and nxt.complete:
                loaded = self._load(nxt)
                if loaded is not None:
                    yield from self._cut(loaded, 0, pending[1:])
                    last_progress = self.clock()
                continue
            if nxt is not None and any(p.complete for p in pending[1:]):
                first = self._blocked.setdefault(nxt.name, self.clock())
                waited = self.clock() - first
                if waited >= self.incomplete_timeout_seconds:
                    self._quarantine(
                        nxt.path, nxt.name,
                        f"no {SUCCESS} after {waited:.1f} s while newer partitions are complete "
                        "(StreamArgs.incomplete_timeout_seconds="
                        f"{self.incomplete_timeout_seconds:g})",
                    )
                    continue
            elif not self.follow:
                return
            if self.follow and self.idle_timeout_seconds is not None:
                idle = self.clock() - last_progress
                if idle >= self.idle_timeout_seconds:
                    logger.info(
                        "stream: %s: no new window for %.1f s (StreamArgs.idle_timeout_seconds): "
                        "stopping", self.path, idle,
                    )
                    return
            self._wait(self.poll_seconds)

    def _stopped(self) -> bool:
        if self.stop is None:
            return False
        if isinstance(self.stop, threading.Event):
            return self.stop.is_set()
        return bool(self.stop())

    def _wait(self, seconds: float) -> None:
        if isinstance(self.stop, threading.Event):
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)

    def _take_as_consumed(self, start: StreamPosition) -> None:
        """Without a ledger (no saved state), the partitions before ``start`` count as consumed."""
        before = [p.name for p in self._listing() if p.is_dir() and p.name < start.partition]
        for name in before:
            self._ledger[name] = _Consumed(None, -1)
        if before:
            logger.info(
                "stream: %s: no saved ledger; the %d partitions before %s count as consumed",
                self.path, len(before), start.partition,
            )

    def _resume(self, start: StreamPosition) -> Iterator[Window]:
        """The rest of the partition ``start`` is inside (errors here are fatal: part of it
        was consumed, so it cannot be set aside)."""
        known = self._ledger.get(start.partition)
        if known is not None and known.rows == start.row:
            return
        path = self.path / start.partition
        if not path.is_dir():
            raise DataError(
                str(path),
                f"the stream position is row {start.row} of this partition, which is no longer in "
                "the stream folder",
            )
        marker = path / SUCCESS
        done = marker.stat().st_mtime if marker.exists() else path.stat().st_mtime
        loaded = self._read(path, start.partition, done)
        if known is not None and known.digest is not None and known.digest != loaded.digest:
            raise DataError(str(path), "changed since the checkpoint consumed part of it")
        if start.row > loaded.rows:
            raise DataError(
                str(path),
                f"has {loaded.rows} rows, fewer than the stream position's row {start.row}",
            )
        self._consume(loaded, path)
        pending = [p for p in self._scan() if p.name != start.partition]
        yield from self._cut(loaded, start.row, pending)

    def _listing(self) -> list[Path]:
        """The folder's entries in name order, without hidden names and the quarantine."""
        quarantine = self.quarantine_dir.resolve()
        return sorted(
            (Path(e.path) for e in os.scandir(self.path)
             if not hidden(e.name) and Path(e.path).resolve() != quarantine),
            key=lambda p: p.name,
        )

    def _scan(self) -> list[_Partition]:
        """The partitions still to read, in name order; sets aside what is in the folder but
        cannot be read in order (a file, a late partition, a consumed one that changed)."""
        pending = []
        for path in self._listing():
            name = path.name
            if not path.is_dir():
                self._quarantine(
                    path, name, "not a folder (each partition is a folder of data files)"
                )
                continue
            if name in self._ledger:
                entry = self._ledger[name]
                if name != self._pos.partition or entry.rows == self._pos.row:  # not mid-read
                    self._check_consumed(name, path)
                continue
            marker = path / SUCCESS
            complete = marker.exists() or not self.require_success
            if name < self._pos.partition:
                if complete:  # (moved once its writer is done with it)
                    self._quarantine(
                        path, name,
                        f"arrived after the stream passed it (the stream is at partition "
                        f"{self._pos.partition}, row {self._pos.row}); partitions must land in "
                        "name order",
                    )
                continue
            done = marker.stat().st_mtime if marker.exists() else path.stat().st_mtime
            pending.append(_Partition(name, path, complete, done))
        return pending

    def _check_consumed(self, name: str, path: Path) -> None:
        entry = self._ledger[name]
        sig = _signature(path)
        if entry.signature is None or entry.signature == sig:
            entry.signature = sig
            return
        if entry.rows < 0:  # taken as consumed without a ledger: content unknown
            unchanged = True
        elif entry.digest is None:  # consumed empty: changed once it holds events
            try:
                unchanged = _count_rows(path) == 0
            except (DataError, OSError, pa.ArrowException):
                unchanged = False
        else:
            unchanged = partition_digest(path) == entry.digest
        if unchanged:
            entry.signature = sig
            return
        self._quarantine(
            path, name,
            "changed after it was consumed (same name as a consumed partition, other content); "
            "its events were consumed as they were then",
        )

    def _read(self, path: Path, name: str, done_time: float) -> _Loaded:
        """Reads and checks a partition; DataError names the file (and line) at fault."""
        files = [f for f in _data_files(path) if f.stat().st_size]
        digest = partition_digest(path)
        rating_col = self.columns.action_column
        parts: list[Columns] = []
        roles_of: list[dict[str, str]] = []  # each file's user / item / timestamp columns
        for f in files:
            cols, have, roles = read_custom_file(f, self.columns, optional_action=True)
            roles_of.append(roles)
            known = {*roles.values(), *self.extra_columns}
            if rating_col:
                known.add(rating_col)
            unknown = [c for c in have if c not in known and not c.startswith("__index_level_")]
            if unknown:
                from hstu.validation import did_you_mean

                missing = [r for r in EVENT_COLUMNS if roles[r] not in have]
                hint = did_you_mean(unknown[0], [roles[r] for r in missing]) if missing else ""
                raise DataError(
                    str(f),
                    f"unknown column(s) {', '.join(unknown)} (read: {', '.join(sorted(known))}; "
                    f"declare others in StreamArgs.extra_columns){hint}",
                    field=unknown[0],
                )
            parts.append(cols)
        if not sum(p.num_rows for p in parts):  # no events: nothing to duplicate
            empty = np.zeros(0, dtype=np.int64)
            return _Loaded(name, done_time, None, empty, empty, empty, None)
        with_rating = ["action" in p.data for p in parts]
        if any(with_rating) and not all(with_rating):
            bad = files[with_rating.index(False)]
            raise DataError(
                str(bad), f"has no {rating_col} column, unlike the partition's other files",
                field=rating_col,
            )
        for key, idmap in (("user", self.users), ("item", self.items)):
            for p, f, roles in zip(parts, files, roles_of):  # text ids cannot join integer ids
                idmap.check(p.data[key], str(f), roles[key])
        for key in ("user", "item"):  # integer ids in one file and text in another: text
            if len({p.data[key].dtype.kind in "iu" for p in parts}) > 1:
                for p in parts:
                    p.data[key] = p.data[key].astype(str)
        if any(with_rating):
            for p in parts:
                p.data["action"] = p.data["action"].astype(np.float64)
        log = Columns.concat(parts)
        t = log.data["time_key"]
        back = np.flatnonzero(t[1:] < t[:-1])
        if back.size:
            r = int(back[0]) + 1
            where = [str(f) for f in files].index(log.locate(r)[0])
            raise log.error(
                r, roles_of[where]["timestamp"],
                f"events out of time order: {t[r]} comes after {t[r - 1]} (events of a "
                "partition must be in time order)",
            )
        for key in ("user", "item"):
            if log.data[key].dtype.kind not in "iu":
                log.data[key] = log.data[key].astype(str)
        seconds = t // 1000 if self.columns.timestamp_unit == "ms" else t
        rating = log.data["action"].astype(np.float64) if any(with_rating) else None
        return _Loaded(name, done_time, digest, log.data["user"], log.data["item"],
                       seconds.astype(np.int64), rating)

    def _load(self, part: _Partition) -> _Loaded | None:
        """The partition read and checked, and entered in the ledger; None (set aside) when bad."""
        try:
            loaded = self._read(part.path, part.name, part.done_time)
        except DataError as exc:
            self._quarantine(part.path, part.name, str(exc))
            return None
        if loaded.digest is not None and loaded.digest in self._digests:
            self._quarantine(
                part.path, part.name,
                f"duplicate: the same content as partition {self._digests[loaded.digest]}, "
                "already consumed",
            )
            return None
        self._consume(loaded, part.path)
        return loaded

    def _consume(self, loaded: _Loaded, path: Path) -> None:
        self._ledger[loaded.name] = _Consumed(loaded.digest, loaded.rows, _signature(path))
        if loaded.digest is not None:
            self._digests[loaded.digest] = loaded.name
        self._rows_cache.pop(loaded.name, None)
        self._blocked.pop(loaded.name, None)

    def _pending_rows(self, pending: list[_Partition]) -> int:
        rows = 0
        for p in pending:
            if not p.complete:
                continue
            sig = _signature(p.path)
            cached = self._rows_cache.get(p.name)
            if cached is None or cached[0] != sig:
                try:
                    cached = (sig, _count_rows(p.path))
                except (DataError, OSError, pa.ArrowException):  # bad: 0 here, set aside when read
                    cached = (sig, 0)
                self._rows_cache[p.name] = cached
            rows += cached[1]
        return rows

    def _cut(self, loaded: _Loaded, row0: int, pending: list[_Partition]) -> Iterator[Window]:
        n = loaded.rows
        self._pos = StreamPosition(loaded.name, row0)
        if row0 >= n:
            self._pos = StreamPosition(loaded.name, n)
            return
        later = self._pending_rows(pending)
        newest = max((p.done_time for p in pending if p.complete), default=loaded.done_time)
        behind = max(0.0, newest - loaded.done_time)
        step = self.max_window_events or n
        for a in range(row0, n, step):
            if a > row0 and self._stopped():
                return
            b = min(a + step, n)
            self._lag = Lag(n - b + later, behind)
            window = Window.cut(
                loaded.name, a, (a, b) == (0, n), self.users, self.items, loaded.user[a:b],
                loaded.item[a:b], loaded.seconds[a:b],
                None if loaded.rating is None else loaded.rating[a:b], self._lag,
            )
            self._pos = window.position_after
            yield window

    def _quarantine(self, path: Path, name: str, reason: str) -> None:
        """Moves ``path`` into the quarantine (as ``<name>``, ``<name>.1``, ...) with a
        _REASON file, and logs one line."""
        reason = reason.replace("\n", " ")
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / name
        k = 0
        while dest.exists():
            k += 1
            dest = self.quarantine_dir / f"{name}.{k}"
        if path.is_dir():
            shutil.move(str(path), str(dest))  # a rename on the same file system
        else:
            dest.mkdir()
            shutil.move(str(path), str(dest / path.name))
        (dest / REASON).write_text(reason + "\n")
        self._blocked.pop(name, None)
        self._rows_cache.pop(name, None)
        self.quarantined.append(Quarantined(name, dest, reason))
        logger.warning("stream: partition %s set aside to %s: %s", name, dest, reason)


__all__ = [
    "QUARANTINE", "REASON", "SUCCESS", "FolderStream", "Quarantined", "hidden", "partition_digest",
]
