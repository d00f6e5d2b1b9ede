"""A stream folder that partitions land in (docs/online.md "The stream folder").

    <stream>/
        2024-05-01T00/            one folder per partition; name order = time order
            part-0000.csv         .csv/.tsv/.txt, .jsonl/.json/.ndjson or .parquet (optionally .gz)
            part-0001.parquet     rows: user_id, item_id, timestamp[, rating] (own-data columns)
            _SUCCESS              empty; the partition counts once it is there
        2024-05-01T01/ ...
        _quarantine/              bad partitions, moved here with a _REASON file
        .staging-xyz/             names starting with "." or "_" are never read

Partitions are read whole, their part files merged by time (a stable sort of the files in name
order: ties by file name, then row), events repeated inside the partition (same user, item and
timestamp) dropped, then cut into windows (all of a partition, or ``max_window_events`` each);
the first window of a partition carries what was done (:attr:`Window.counts`). An OS error while
reading is retried with backoff, then stops the run (:class:`ReadFailed`). Every bad partition
costs one log line naming it (and the file and line where there is one), is moved into the
quarantine with a ``_REASON`` file, and the stream goes on; nothing is lost and nothing is
yielded twice (the ledger of consumed partitions is part of :meth:`FolderStream.state_dict`).
A quarantined partition is put back by :func:`reingest` (``python -m hstu.data.stream
reingest``), with a ``_REINGEST`` marker that lets it in behind the stream's position.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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
REINGEST = "_REINGEST"
"""The marker of a partition put back from the quarantine (:func:`reingest`): it is read even
though its name sorts before the stream's position (once: the ledger remembers it)."""
COUNTS = ("merged_files", "reordered_events", "duplicate_events", "read_retries")
"""The keys of :attr:`Window.counts` (the first window of each partition):

- ``merged_files``: the partition's data files holding events, when there are two or more (their
  events merged by time); 0 for one file.
- ``reordered_events``: events not in time order in their own file: for each file, its events
  minus the longest run of them (not necessarily adjacent) already in time order, i.e. the
  fewest events that had to move; summed over the files.
- ``duplicate_events``: events dropped because an earlier one of the partition (in the merged
  order) has the same user, item and timestamp.
- ``read_retries``: reads of the partition's files (or its listing) that failed with an OS error
  and were tried again.
"""

T = TypeVar("T")

Stop = threading.Event | Callable[[], bool] | None


class ReadFailed(DataError):
    """A stream folder's file that could not be read (an OS error) after the retries: the run
    stops (never a reason to set a partition aside: the file may be fine)."""


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
    counts: dict[str, int] = field(default_factory=dict)
    """What was done to its rows when read (COUNTS)."""
    notes: list[str] = field(default_factory=list)
    """Where: the first event out of order, the first duplicate (for the log line)."""

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


def _read_file(path: Path) -> bytes:
    """A data file's bytes (the one place a partition's files are read from)."""
    return path.read_bytes()


def _digest(file_digests: list[str]) -> str | None:
    """The partition's hash of its non-empty files' sha256 hex digests (any order)."""
    if not file_digests:
        return None
    return hashlib.sha256("\n".join(sorted(file_digests)).encode()).hexdigest()


def partition_digest(path: Path) -> str | None:
    """Content hash of a partition: the sorted hashes of its data files (so the same data
    under other file names hashes the same); None when it holds no data."""
    return _digest([hashlib.sha256(raw).hexdigest() for f in _data_files(path)
                    if (raw := f.read_bytes())])


def _repeats(t: np.ndarray, user: np.ndarray, item: np.ndarray
             ) -> tuple[np.ndarray, int, int] | None:
    """The events of ``t``, ``user``, ``item`` [R] (``t`` sorted) that repeat an earlier one's
    timestamp, user and item: (bool [R], the first repeat, the event it repeats); None if none.
    Only events sharing their timestamp with a neighbour can repeat one: C of them are sorted."""
    eq = t[1:] == t[:-1]
    if not bool(eq.any()):
        return None
    tied = np.zeros(len(t), dtype=bool)
    tied[1:] |= eq
    tied[:-1] |= eq
    rows = np.flatnonzero(tied)  # [C]
    idx = rows[np.lexsort((item[rows], user[rows], t[rows]))]  # stable: equal ones keep order
    ts, us, its = t[idx], user[idx], item[idx]
    same = (ts[1:] == ts[:-1]) & (us[1:] == us[:-1]) & (its[1:] == its[:-1])  # [C-1]
    if not bool(same.any()):
        return None
    repeat = np.zeros(len(t), dtype=bool)
    repeat[idx[1:][same]] = True
    j = int(np.flatnonzero(repeat)[0])
    q = int(np.flatnonzero(idx == j)[0])  # its place in the sorted order: walk to its group's first
    while q > 0 and same[q - 1]:
        q -= 1
    return repeat, j, int(idx[q])


def _out_of_order(t: np.ndarray) -> int:
    """Events of ``t`` [R] not in time order: R minus its longest non-decreasing subsequence
    (the fewest events that must move to sort it; equal times are in order)."""
    if len(t) < 2 or bool(np.all(t[1:] >= t[:-1])):
        return 0
    tails: list[int] = []  # tails[k]: the smallest last time of an ordered run of k + 1 events
    for v in t.tolist():
        k = bisect.bisect_right(tails, v)
        if k == len(tails):
            tails.append(v)
        else:
            tails[k] = v
    return len(t) - len(tails)


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
    "require_success", "quarantine_dir", "max_window_events", "extra_columns", "read_retries",
    "retry_backoff_seconds",
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
        read_retries: an OS error while listing or reading a partition's files is retried
            this many times, then the run stops (:class:`ReadFailed`).
        retry_backoff_seconds: the wait before the first retry, doubled before each next one.
        stop: a threading.Event or a callable; once set / true, ``windows`` returns at the
            next window or poll.
        clock: the time source (tests pass a fast one).
        sleep: how a retry waits (tests pass one that does not).
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
        read_retries: int = 5,
        retry_backoff_seconds: float = 1.0,
        stop: Stop = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
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
        self.read_retries = read_retries
        self.retry_backoff_seconds = retry_backoff_seconds
        self.stop = stop
        self.clock = clock
        self.sleep = sleep
        self._retries = 0  # retries of the partition being read
        self.users = IdMap("user")
        self.items = IdMap("item")
        self.quarantined: list[Quarantined] = []
        """Partitions this object set aside, in order (``len``: how many so far)."""
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
                    yield from self._cut(loaded, 0, pending[1:], loaded.counts)
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
        if (self.path / start.partition / REINGEST).exists():
            raise DataError(
                str(self.path / start.partition),
                "the stream position is in this re-ingested partition, which sorts before "
                "partitions consumed earlier: resuming from it needs the saved ledger "
                "(load_stream of the checkpoint), not a bare position",
            )
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
        loaded = self._read(path, start.partition, done)  # merged and deduplicated again
        if known is not None and known.digest is not None and known.digest != loaded.digest:
            raise DataError(str(path), "changed since the checkpoint consumed part of it")
        if start.row > loaded.rows:
            raise DataError(
                str(path),
                f"has {loaded.rows} rows, fewer than the stream position's row {start.row}",
            )
        self._consume(loaded, path)
        pending = [p for p in self._scan() if p.name != start.partition]
        # its counts went with its first window before the resume; only new retries count
        retries = loaded.counts.get("read_retries", 0)
        yield from self._cut(loaded, start.row, pending,
                             {"read_retries": retries} if retries else {})

    def _listing(self) -> list[Path]:
        """The folder's entries in name order, without hidden names and the quarantine."""
        quarantine = self.quarantine_dir.resolve()
        entries = self._retrying(self.path, lambda: list(os.scandir(self.path)))
        return sorted(
            (Path(e.path) for e in entries
             if not hidden(e.name) and Path(e.path).resolve() != quarantine),
            key=lambda p: p.name,
        )

    def _scan(self) -> list[_Partition]:
        """The partitions still to read, in name order; sets aside what is in the folder but
        cannot be read in order (a file, a late partition, a consumed one that changed).

        A partition is late when its name sorts before the furthest partition the stream has
        consumed (its position, or a later empty one); a late one with a _REINGEST marker
        (put back from the quarantine) is read, ahead of the partitions in name order."""
        pending = []
        furthest = max(self._pos.partition, max(self._ledger, default=""))
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
            if name < furthest and not (path / REINGEST).exists():
                if complete:  # (moved once its writer is done with it)
                    self._quarantine(
                        path, name,
                        f"arrived after the stream passed it (the stream is at partition "
                        f"{self._pos.partition}, row {self._pos.row}"
                        + ("" if furthest == self._pos.partition else f"; consumed {furthest}")
                        + "); partitions must land in name order (to feed it in anyway: "
                        "python -m hstu.data.stream reingest)",
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
                unchanged = self._read(path, name, 0.0).rows == 0
            except ReadFailed:
                raise
            except DataError:  # holds something that is not even events
                unchanged = False
        else:
            unchanged = self._retrying(path, lambda: partition_digest(path)) == entry.digest
        if unchanged:
            entry.signature = sig
            return
        self._quarantine(
            path, name,
            "changed after it was consumed (same name as a consumed partition, other content); "
            "its events were consumed as they were then",
        )

    def _retrying(self, where: Path, what: Callable[[], T]) -> T:
        """``what()``, tried again after an OS error (``read_retries`` times, waiting
        ``retry_backoff_seconds``, doubled each time; one warning line each); then
        :class:`ReadFailed` naming the file. Other errors pass through."""
        wait = self.retry_backoff_seconds
        for attempt in range(self.read_retries + 1):
            try:
                return what()
            except OSError as exc:
                failed = exc.filename or where
                error = exc.strerror or str(exc) or type(exc).__name__
                if attempt == self.read_retries:
                    raise ReadFailed(
                        str(failed),
                        f"cannot be read: {error} (tried {attempt + 1} times, "
                        f"StreamArgs.read_retries={self.read_retries}); the stream stops here: "
                        "once the file can be read, resume from the last checkpoint",
                    ) from None
                self._retries += 1
                logger.warning("stream: reading %s failed: %s; retry %d of %d in %g s",
                               failed, error, attempt + 1, self.read_retries, wait)
                self.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    def _read(self, path: Path, name: str, done_time: float) -> _Loaded:
        """Reads and checks a partition, its files merged by time and its repeated events
        dropped; DataError names the file (and line) at fault, ReadFailed a file that could not
        be read (OS errors, after the retries)."""
        self._retries = 0
        rating_col = self.columns.action_column
        files: list[Path] = []  # the non-empty data files, in name order
        file_digests: list[str] = []
        parts: list[Columns] = []
        roles_of: list[dict[str, str]] = []  # each file's user / item / timestamp columns
        for f in self._retrying(path, lambda: _data_files(path)):
            raw = self._retrying(f, lambda f=f: _read_file(f))
            if not raw:
                continue
            file_digests.append(hashlib.sha256(raw).hexdigest())
            cols, have, roles = read_custom_file(f, self.columns, optional_action=True, data=raw)
            del raw
            files.append(f)
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
        counts = dict.fromkeys(COUNTS, 0)
        counts["read_retries"] = self._retries
        if not sum(p.num_rows for p in parts):  # no events: nothing to duplicate
            empty = np.zeros(0, dtype=np.int64)
            return _Loaded(name, done_time, None, empty, empty, empty, None, counts)
        digest = _digest(file_digests)
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
        notes: list[str] = []
        n_files = sum(p.num_rows > 0 for p in parts)
        counts["merged_files"] = n_files if n_files > 1 else 0
        for p, roles in zip(parts, roles_of):  # events out of order in their own file
            moved = _out_of_order(p.data["time_key"])
            if moved and not counts["reordered_events"]:
                ft = p.data["time_key"]
                r = int(np.flatnonzero(ft[1:] < ft[:-1])[0]) + 1
                file, line = p.locate(r)
                notes.append(f"first out of order: {file}:{line}: field {roles['timestamp']}: "
                             f"{ft[r]} after {ft[r - 1]}")
            counts["reordered_events"] += moved
        log = Columns.concat(parts)
        for key in ("user", "item"):
            if log.data[key].dtype.kind not in "iu":
                log.data[key] = log.data[key].astype(str)
        t = log.data["time_key"]
        # the merge: a stable sort of the files concatenated in name order (ties: file, row)
        order = (np.arange(len(t)) if bool(np.all(t[1:] >= t[:-1]))
                 else np.argsort(t, kind="stable"))
        user, item, t = log.data["user"][order], log.data["item"][order], t[order]
        rating = log.data["action"][order].astype(np.float64) if any(with_rating) else None
        # repeated events (same user, item and timestamp): the first in the merged order stays
        found = _repeats(t, user, item)
        if found is not None:
            repeat, j, twin = found
            (file, line), (file0, line0) = log.locate(int(order[j])), log.locate(int(order[twin]))
            notes.append(f"first duplicate: {file}:{line} repeats {file0}:{line0}")
            counts["duplicate_events"] = int(repeat.sum())
            keep = ~repeat
            user, item, t = user[keep], item[keep], t[keep]
            rating = None if rating is None else rating[keep]
        seconds = t // 1000 if self.columns.timestamp_unit == "ms" else t
        return _Loaded(name, done_time, digest, user, item, seconds.astype(np.int64), rating,
                       counts, notes)

    def _load(self, part: _Partition) -> _Loaded | None:
        """The partition read and checked, and entered in the ledger; None (set aside) when bad."""
        try:
            loaded = self._read(part.path, part.name, part.done_time)
        except ReadFailed:  # not the partition's fault: the run stops
            raise
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
        done = {k: v for k, v in loaded.counts.items() if v}
        if done:
            level = (logging.WARNING if done.keys() & {"reordered_events", "duplicate_events"}
                     else logging.INFO)
            logger.log(level, "stream: partition %s: %s%s", part.name,
                       ", ".join(f"{k}={v}" for k, v in done.items()),
                       "".join(f"; {note}" for note in loaded.notes))
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

    def _cut(self, loaded: _Loaded, row0: int, pending: list[_Partition],
             counts: dict[str, int]) -> Iterator[Window]:
        """Windows of rows ``row0`` .. of ``loaded``; the first one carries ``counts``."""
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
                counts=counts if a == row0 else {},
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


def reingest(stream: str | Path, name: str, new_name: str | None = None,
             quarantine_dir: str | Path | None = None) -> Path:
    """Puts the quarantined partition ``name`` back into ``stream`` (as ``new_name``, default
    ``name``) for the stream to read once; returns its new path.

    Writes a ``_REINGEST`` marker into it (what it was set aside for, where it came from: the
    marker lets it in though its name sorts before the stream's position; the stream's ledger
    makes sure it is consumed once) and an empty ``_SUCCESS`` if it has none (putting it back
    says it is complete), then renames it into the stream folder (one rename: a running stream
    sees all of it or nothing) and removes its ``_REASON``. A quarantine on another file system
    is copied into a hidden folder of the stream first, then renamed. DataError: no such
    quarantined partition, a name that is taken or hidden, a file in it that is not data."""
    root = Path(stream)
    if not root.is_dir():
        raise DataError(str(root), "no such stream folder")
    qdir = Path(quarantine_dir) if quarantine_dir else root / QUARANTINE
    dest_name = name if new_name is None else new_name
    for value in (name, dest_name):
        if not value or "/" in value or os.sep in value or hidden(value):
            raise DataError(repr(value), "not a partition name (a folder name that does not "
                            "start with '.' or '_')")
    src = qdir / name
    if not src.is_dir():
        there = sorted(p.name for p in qdir.iterdir() if p.is_dir()) if qdir.is_dir() else []
        listed = ", ".join(there[:10]) + (", ..." if len(there) > 10 else "")
        raise DataError(str(src), f"no such quarantined partition (in {qdir}: {listed or 'none'})")
    dest = root / dest_name
    if dest.exists():
        raise DataError(str(dest), "is in the stream folder already: put the partition back "
                        "under another name with --as NEW_NAME")
    _data_files(src)  # a file that is not data would set it aside again: say so now
    reason_file = src / REASON
    reason = reason_file.read_text().strip() if reason_file.exists() else "(no _REASON)"
    (src / REINGEST).write_text(f"re-ingested from {src} as {dest_name}; it had been set aside: "
                                f"{reason}\n")
    if not (src / SUCCESS).exists():
        (src / SUCCESS).write_text("")
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        staging = root / f".reingest-{dest_name}"  # hidden: never read while it is copied
        shutil.copytree(src, staging)
        os.rename(staging, dest)
        shutil.rmtree(src)
    (dest / REASON).unlink(missing_ok=True)
    return dest


__all__ = [
    "COUNTS", "QUARANTINE", "REASON", "REINGEST", "SUCCESS", "FolderStream", "Quarantined",
    "ReadFailed", "hidden", "partition_digest", "reingest",
]
