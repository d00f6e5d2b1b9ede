"""Users' recent histories for online training, on disk in SQLite (docs/online.md "The user store").

One row per user: the user's last ``max_sequence_length`` events (items, timestamps,
ratings) as three little-endian arrays. Each data-parallel rank keeps the users it owns,
``dense user id % world_size == rank``, in its own file. The working file is scratch: a
checkpoint holds a consistent copy (SQLite's online backup into a temporary file, fsynced,
then renamed into place), and a run that resumes starts from that copy, never from the
working file a killed run left behind. A checkpoint may instead hold a delta
(:meth:`UserStore.checkpoint_delta`): for each user only appended to since the previous
checkpoint, the events appended since (a delta grows with the events of its interval, not
with the users' history lengths); for a user rewritten otherwise (a late event placed into
the history, a history dropped and begun again), the whole row; and the users deleted since.
:meth:`UserStore.restore` applies the deltas in order on top of a full snapshot.

Memory: SQLite's page cache is bounded (``cache_mib``); an append holds one window's rows.
Nothing grows with the number of events seen, only the file does (with the number of users).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hstu.data.errors import DataError
from hstu.data.stream.core import Window, atomic_path

logger = logging.getLogger("hstu.data.stream")

FORMAT = 2
"""2: each user's newest event time in a column (expiry); 1 had none."""
SNAPSHOT = "user_store.rank{rank}-of-{world}.sqlite"
_SNAPSHOT_RE = re.compile(r"user_store\.rank(\d+)-of-(\d+)\.sqlite")
DELTA = "user_store_delta.rank{rank}-of-{world}.sqlite"
_DELTA_RE = re.compile(r"user_store_delta\.rank(\d+)-of-(\d+)\.sqlite")
# every write to the history table (append, insert, any DELETE, whatever method issues it) is
# recorded per user in a temporary table (not part of a snapshot): what changed since the
# last checkpoint. ``added``: events appended since; ``full``: the row was rewritten some
# other way (or deleted first), so a delta carries it whole. A write counts as an append only
# for the users :meth:`UserStore.append_events` names in ``appending`` for that statement;
# any other write marks the row whole. A REPLACE fires the insert trigger only (recursive
# triggers are off).
_TRACK = (
    ("CREATE TEMP TABLE changed (user INTEGER PRIMARY KEY, deleted INTEGER NOT NULL, "
     "full INTEGER NOT NULL, added INTEGER NOT NULL)"),
    "CREATE TEMP TABLE appending (user INTEGER PRIMARY KEY, added INTEGER NOT NULL)",
    ("CREATE TEMP TRIGGER changed_insert AFTER INSERT ON history BEGIN "
     "INSERT INTO changed VALUES (NEW.user, 0, "
     "COALESCE((SELECT 0 FROM appending WHERE user = NEW.user), 1), "
     "COALESCE((SELECT added FROM appending WHERE user = NEW.user), 0)) "
     "ON CONFLICT (user) DO UPDATE SET full = (changed.full OR changed.deleted OR excluded.full), "
     "deleted = 0, added = changed.added + excluded.added; END"),
    ("CREATE TEMP TRIGGER changed_update AFTER UPDATE ON history BEGIN "
     "INSERT OR REPLACE INTO changed VALUES (NEW.user, 0, 1, 0); END"),
    ("CREATE TEMP TRIGGER changed_delete AFTER DELETE ON history BEGIN "
     "INSERT OR REPLACE INTO changed VALUES (OLD.user, 1, 1, 0); END"),
)
_CHUNK = 500  # users per SELECT ... IN (...) (SQLite's limit on parameters is larger)


@dataclass
class Histories:
    """Users' histories, jagged. Legend: B users asked for, T their events in all.

    offsets int64 [B+1] (user b's events are offsets[b]:offsets[b+1], oldest first);
    items int64 [T]; timestamps int64 [T]; ratings float64 [T] (NaN where the event had none).
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    ratings: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class Sequences(Histories):
    """Histories followed by a window's events (:meth:`UserStore.sequences`). Legend: B users
    of the window this rank owns, in order of first appearance in the window.

    users int64 [B]; num_new int64 [B]: the last num_new[b] events of sequence b are the
    window's (in the window's order); the ones before them came from the store. Not cut to
    max_sequence_length (a sequence holds up to that many stored events plus the new ones).
    """

    users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    num_new: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def owner(users: np.ndarray, world_size: int) -> np.ndarray:
    """The data-parallel rank owning each dense user id [E]: ``user % world_size``."""
    return np.asarray(users, dtype=np.int64) % world_size


class UserStore:
    """The recent histories of the users one rank owns.

    Args:
        path: the working file (created; one left by a killed run is replaced).
        max_sequence_length: events kept per user (the newest).
        rank, world_size: this rank owns users with ``user % world_size == rank``.
        cache_mib: SQLite's page cache (the store's memory bound).
    """

    def __init__(
        self,
        path: str | Path,
        max_sequence_length: int,
        rank: int = 0,
        world_size: int = 1,
        cache_mib: int = 16,
    ) -> None:
        assert max_sequence_length >= 1 and 0 <= rank < world_size
        self.path = Path(path)
        self.max_sequence_length = max_sequence_length
        self.rank, self.world_size = rank, world_size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-journal"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)
        self._conn = self._open(self.path, cache_mib)
        with self._conn:
            self._conn.execute(
                "CREATE TABLE history (user INTEGER PRIMARY KEY, n INTEGER NOT NULL, "
                "items BLOB NOT NULL, timestamps BLOB NOT NULL, ratings BLOB NOT NULL, "
                "last INTEGER NOT NULL)"
            )
            self._conn.execute("CREATE INDEX history_last ON history (last, user)")
            self._conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("format", str(FORMAT)), ("max_sequence_length", str(max_sequence_length))],
            )
            for statement in _TRACK:
                self._conn.execute(statement)

    @staticmethod
    def _open(path: Path, cache_mib: int) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level="DEFERRED")
        # scratch file (a checkpoint is the durable copy): no fsync, rollback journal in memory
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA journal_mode = MEMORY")
        conn.execute(f"PRAGMA cache_size = -{int(cache_mib) * 1024}")
        return conn

    def close(self) -> None:
        self._conn.close()

    # ------------------------------------------------------------------ contents

    def owns(self, users: np.ndarray) -> np.ndarray:
        """bool [E]: which of ``users`` this rank owns."""
        return owner(users, self.world_size) == self.rank

    def num_users(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM history").fetchone()[0])

    def _fetch(self, users: np.ndarray) -> dict[int, tuple[bytes, bytes, bytes]]:
        out: dict[int, tuple[bytes, bytes, bytes]] = {}
        ids = [int(u) for u in np.unique(users)]
        for k in range(0, len(ids), _CHUNK):
            chunk = ids[k : k + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for user, items, ts, ratings in self._conn.execute(
                "SELECT user, items, timestamps, ratings FROM history "
                f"WHERE user IN ({marks})",
                chunk,
            ):
                out[user] = (items, ts, ratings)
        return out

    def append(self, window: Window) -> int:
        """Appends the window's events of the users this rank owns (in the window's order),
        keeping each user's newest max_sequence_length; returns how many events it took."""
        return self.append_events(window.user, window.item, window.timestamp, window.rating)

    def append_events(
        self,
        user: np.ndarray,
        item: np.ndarray,
        timestamp: np.ndarray,
        rating: np.ndarray | None = None,
    ) -> int:
        """As :meth:`append`, from columns [E] (rating None: NaN)."""
        mine = self.owns(user)
        if not mine.any():
            return 0
        user = np.asarray(user, dtype=np.int64)[mine]
        users, inverse = np.unique(user, return_inverse=True)
        seq = self._combine(users, inverse.reshape(-1), item, timestamp, rating, mine)
        self._write(users, seq, appended=seq.num_new)
        return len(user)

    def _write(self, users: np.ndarray, seq: Histories,
               appended: np.ndarray | None = None) -> None:
        """Stores the histories ``seq`` of ``users`` [B] (each cut to its newest
        max_sequence_length), replacing theirs. ``appended`` [B]: each history is the stored
        one followed by that many new events (recorded as such for a delta); None: the rows
        are rewritten (a delta carries them whole)."""
        lengths = seq.lengths
        keep = np.minimum(lengths, self.max_sequence_length)
        pos = np.arange(int(seq.offsets[-1])) - np.repeat(seq.offsets[:-1], lengths)
        kept = pos >= np.repeat(lengths - keep, lengths)
        ends = np.cumsum(keep) * 8
        starts = ends - keep * 8
        blobs = [
            seq.items[kept].astype("<i8").tobytes(),
            seq.timestamps[kept].astype("<i8").tobytes(),
            seq.ratings[kept].astype("<f8").tobytes(),
        ]
        last = seq.timestamps[np.maximum(seq.offsets[1:] - 1, 0)] if len(seq.timestamps) else \
            np.zeros(len(users), np.int64)  # each user's newest event (histories are not empty)
        rows = [
            (u, n, blobs[0][a:b], blobs[1][a:b], blobs[2][a:b], t)
            for u, n, a, b, t in zip(users.tolist(), keep.tolist(), starts.tolist(),
                                     ends.tolist(), last.tolist())
        ]
        with self._conn:
            if appended is not None:
                self._conn.executemany("INSERT INTO temp.appending VALUES (?, ?)",
                                       zip(users.tolist(), appended.tolist()))
            self._conn.executemany(
                "INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?, ?, ?)", rows)
            if appended is not None:
                self._conn.execute("DELETE FROM temp.appending")

    def _combine(
        self,
        users: np.ndarray,
        b_of_event: np.ndarray,
        item: np.ndarray,
        timestamp: np.ndarray,
        rating: np.ndarray | None,
        mine: np.ndarray,
    ) -> Sequences:
        """Stored histories of ``users`` [B] followed by the events (``[mine]`` of the columns
        [E]; event e is user ``users[b_of_event[e]]``'s), in the events' order per user."""
        item = np.asarray(item, dtype=np.int64)[mine]
        ts = np.asarray(timestamp, dtype=np.int64)[mine]
        r = np.full(len(item), np.nan) if rating is None else np.asarray(rating, np.float64)[mine]
        hist = self.histories(users)
        num_new = np.bincount(b_of_event, minlength=len(users)).astype(np.int64)
        lengths = hist.lengths + num_new
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # where each stored event and each new event goes
        b_hist = np.repeat(np.arange(len(users)), hist.lengths)
        at_hist = offsets[b_hist] + (np.arange(len(hist.items)) - hist.offsets[b_hist])
        order = np.argsort(b_of_event, kind="stable")  # by user, the events' order within one
        b_new = b_of_event[order]
        starts = np.concatenate([[0], np.cumsum(num_new)[:-1]]).astype(np.int64)
        at_new = offsets[b_new] + hist.lengths[b_new] + (np.arange(len(order)) - starts[b_new])
        out = {}
        for name, old, new, dtype in (("items", hist.items, item, np.int64),
                                      ("timestamps", hist.timestamps, ts, np.int64),
                                      ("ratings", hist.ratings, r, np.float64)):
            arr = np.empty(int(offsets[-1]), dtype=dtype)
            arr[at_hist] = old
            arr[at_new] = new[order]
            out[name] = arr
        return Sequences(offsets=offsets, items=out["items"], timestamps=out["timestamps"],
                         ratings=out["ratings"], users=users, num_new=num_new)

    def screen(self, window: Window, late: str = "insert") -> tuple[Window, dict[str, int]]:
        """The window without the events of this rank's users that the store already decides:
        an event equal to one in its user's stored history (same item and timestamp: a repeat,
        dropped) and an event older than its user's newest stored event (late: with ``late =
        "insert"`` placed into the stored history in time order, as history only, never
        tested nor a target; with "drop" dropped). Other ranks' events are kept (they are
        theirs to screen). Returns (the window, {"repeated_events", "late_events"} of this
        rank)."""
        mine = np.flatnonzero(self.owns(window.user))
        counts = {"repeated_events": 0, "late_events": 0}
        if not len(mine):
            return window, counts
        user = np.asarray(window.user, np.int64)[mine]
        ts = np.asarray(window.timestamp, np.int64)[mine]
        item = np.asarray(window.item, np.int64)[mine]
        uniq, inv = np.unique(user, return_inverse=True)
        inv = inv.reshape(-1)
        hist = self.histories(uniq)
        has = hist.lengths > 0
        newest = np.full(len(uniq), np.iinfo(np.int64).min)
        newest[has] = hist.timestamps[hist.offsets[1:][has] - 1]
        old = ts <= newest[inv]  # at or before the newest stored event: maybe a repeat
        repeat = np.zeros(len(mine), bool)
        if old.any():
            b_hist = np.repeat(np.arange(len(uniq)), hist.lengths)
            stored = set(zip(b_hist.tolist(), hist.items.tolist(), hist.timestamps.tolist()))
            cand = np.flatnonzero(old)
            repeat[cand] = [(b, i, t) in stored for b, i, t in
                            zip(inv[cand].tolist(), item[cand].tolist(), ts[cand].tolist())]
        is_late = (ts < newest[inv]) & ~repeat
        counts["repeated_events"] = int(repeat.sum())
        counts["late_events"] = int(is_late.sum())
        if not repeat.any() and not is_late.any():
            return window, counts
        if late == "insert" and is_late.any():
            rows = mine[is_late]
            rating = None if window.rating is None else np.asarray(window.rating)[rows]
            self.insert_events(np.asarray(window.user)[rows], np.asarray(window.item)[rows],
                               np.asarray(window.timestamp)[rows], rating)
        keep = np.ones(window.num_events, bool)
        keep[mine[repeat | is_late]] = False
        return window.select(keep), counts

    def insert_events(self, user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
                      rating: np.ndarray | None = None) -> None:
        """Places events into their users' stored histories in time order (after stored
        events of the same timestamp), keeping each user's newest max_sequence_length."""
        mine = self.owns(user)
        user = np.asarray(user, np.int64)[mine]
        users, inverse = np.unique(user, return_inverse=True)
        seq = self._combine(users, inverse.reshape(-1), item, timestamp, rating, mine)
        b = np.repeat(np.arange(len(users)), seq.lengths)
        order = np.lexsort((seq.timestamps, b))  # stable: stored before inserted on ties
        self._write(users, Histories(seq.offsets, seq.items[order], seq.timestamps[order],
                                     seq.ratings[order]))

    def expire(self, before: int | None = None, max_users: int | None = None) -> int:
        """Drops the users whose newest event is older than event time ``before``, then, beyond
        ``max_users``, those whose newest event is oldest (ties: lowest user first); returns
        how many. A dropped user's next event starts a new history."""
        dropped = 0
        with self._conn:
            if before is not None:
                dropped += self._conn.execute(
                    "DELETE FROM history WHERE last < ?", (int(before),)).rowcount
            if max_users is not None:
                over = self.num_users() - int(max_users)
                if over > 0:
                    dropped += self._conn.execute(
                        "DELETE FROM history WHERE user IN (SELECT user FROM history "
                        "ORDER BY last, user LIMIT ?)", (over,)).rowcount
        return dropped

    def histories(self, users: np.ndarray) -> Histories:
        """The histories of ``users`` [B] (owned by this rank; a user never seen has none)."""
        users = np.asarray(users, dtype=np.int64)
        if not self.owns(users).all():
            bad = int(users[~self.owns(users)][0])
            raise ValueError(
                f"user {bad} belongs to rank {bad % self.world_size}, not to rank {self.rank} "
                f"(users are sharded by user % {self.world_size})"
            )
        found = self._fetch(users)
        empty = (b"", b"", b"")
        blobs = [found.get(int(u), empty) for u in users]
        lengths = np.asarray([len(b[0]) // 8 for b in blobs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

        def cat(k: int, dtype: str, out: type) -> np.ndarray:
            return np.frombuffer(b"".join(b[k] for b in blobs), dtype).astype(out)

        return Histories(offsets, cat(0, "<i8", np.int64), cat(1, "<i8", np.int64),
                         cat(2, "<f8", np.float64))

    def sequences(self, window: Window) -> Sequences:
        """Each owned user's stored history followed by the user's events of ``window`` (call
        it before :meth:`append` of that window): the input of test-then-train, where the
        window's events are the targets and everything before an event is its history."""
        mine = self.owns(window.user)
        user = np.asarray(window.user, dtype=np.int64)[mine]
        uniq, first, inverse = np.unique(user, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")
        rank_of = np.empty(len(uniq), dtype=np.int64)
        rank_of[by_first] = np.arange(len(uniq))
        return self._combine(uniq[by_first], rank_of[inverse.reshape(-1)], window.item,
                             window.timestamp, window.rating, mine)

    def iter_users(self) -> Iterator[tuple[int, Histories]]:
        """Every stored user with its history, by user id (for checks and resharding)."""
        for user, items, ts, ratings in self._conn.execute(
            "SELECT user, items, timestamps, ratings FROM history ORDER BY user"
        ):
            n = len(items) // 8
            yield user, Histories(
                np.asarray([0, n], dtype=np.int64),
                np.frombuffer(items, "<i8").astype(np.int64),
                np.frombuffer(ts, "<i8").astype(np.int64),
                np.frombuffer(ratings, "<f8").astype(np.float64),
            )

    # ------------------------------------------------------------------ checkpoints

    def snapshot_name(self) -> str:
        return SNAPSHOT.format(rank=self.rank, world=self.world_size)

    def checkpoint(self, directory: str | Path) -> Path:
        """Writes a consistent copy into ``directory`` atomically (SQLite backup into a
        temporary file, fsync, rename); returns its path. The changes since the last
        checkpoint stay recorded until :meth:`clear_changes`."""
        dest = Path(directory) / self.snapshot_name()
        with atomic_path(dest) as tmp:
            tmp.unlink()
            out = sqlite3.connect(tmp)
            try:
                self._conn.backup(out)
            finally:
                out.close()
        return dest

    def changes(self) -> tuple[int, int]:
        """(users written, users deleted) since the last :meth:`clear_changes`."""
        written, deleted = self._conn.execute(
            "SELECT COUNT(*) - COALESCE(SUM(deleted), 0), COALESCE(SUM(deleted), 0) "
            "FROM temp.changed").fetchone()
        return int(written), int(deleted)

    def clear_changes(self) -> None:
        """Forgets the recorded changes: call it once a checkpoint holding them is published."""
        with self._conn:
            self._conn.execute("DELETE FROM temp.changed")

    def checkpoint_delta(self, directory: str | Path) -> Path:
        """Writes the changes since the last :meth:`clear_changes` into ``directory``
        atomically: ``user_store_delta.rank<r>-of-<w>.sqlite`` holding, in table ``history``
        (a snapshot's columns plus ``tail``), for each user only appended to since, the events
        appended (``tail`` 1: they follow the user's stored events, the newest
        max_sequence_length kept), for each user rewritten otherwise, the whole current row
        (``tail`` 0: it replaces the stored one), and in table ``deleted`` the users deleted
        since; returns its path. :meth:`restore` applies it on top of the snapshot (and
        deltas) before it."""
        dest = Path(directory) / DELTA.format(rank=self.rank, world=self.world_size)
        with atomic_path(dest) as tmp:
            tmp.unlink()
            self._conn.execute("ATTACH DATABASE ? AS delta", (str(tmp),))
            try:
                # small pages: a delta of a few users is a few kB, not four tables' 4 kB pages;
                # no journal or syncs while it is written (a temporary file, fsynced once
                # whole before its rename)
                for pragma in ("page_size = 512", "journal_mode = OFF", "synchronous = OFF"):
                    self._conn.execute(f"PRAGMA delta.{pragma}")
                with self._conn:
                    for statement in (
                        ("CREATE TABLE delta.history (user INTEGER PRIMARY KEY, n INTEGER NOT "
                         "NULL, items BLOB NOT NULL, timestamps BLOB NOT NULL, ratings BLOB NOT "
                         "NULL, last INTEGER NOT NULL, tail INTEGER NOT NULL)"),
                        "CREATE TABLE delta.deleted (user INTEGER PRIMARY KEY)",
                        "CREATE TABLE delta.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                        # k: the events a row carries (its newest; all of a whole row)
                        ("INSERT INTO delta.history SELECT user, k, substr(items, 1 + 8 * "
                         "(n - k)), substr(timestamps, 1 + 8 * (n - k)), substr(ratings, 1 + 8 "
                         "* (n - k)), last, k < n FROM (SELECT h.*, CASE WHEN c.full THEN h.n "
                         "ELSE min(c.added, h.n) END AS k FROM main.history h JOIN "
                         "temp.changed c ON h.user = c.user WHERE c.deleted = 0) ORDER BY user"),
                        ("INSERT INTO delta.deleted SELECT user FROM temp.changed WHERE deleted "
                         "= 1 ORDER BY user"),
                    ):
                        self._conn.execute(statement)
                    self._conn.executemany(
                        "INSERT INTO delta.meta VALUES (?, ?)",
                        [("format", str(FORMAT)), ("kind", "delta"),
                         ("max_sequence_length", str(self.max_sequence_length))])
            finally:
                self._conn.execute("DETACH DATABASE delta")
        return dest

    @staticmethod
    def _files(directory: Path, pattern: re.Pattern[str], what: str) -> list[Path]:
        """The per-rank files of one checkpoint (``pattern``: snapshot or delta), rank order,
        checked: one world size, every rank's file."""
        saved = sorted(
            (int(m.group(1)), int(m.group(2)), p)
            for p in directory.iterdir()
            if (m := pattern.fullmatch(p.name))
        )
        if not saved:
            name = "user_store.rank*-of-*.sqlite" if pattern is _SNAPSHOT_RE else \
                "user_store_delta.rank*-of-*.sqlite"
            raise DataError(str(directory), f"no user store {what} ({name})")
        worlds = {w for _, w, _ in saved}
        if len(worlds) > 1:
            raise DataError(
                str(directory), f"user store {what}s of several world sizes {sorted(worlds)}"
            )
        saved_world = worlds.pop()
        if len(saved) != saved_world or [r for r, _, _ in saved] != list(range(saved_world)):
            raise DataError(
                str(directory), f"{len(saved)} user store {what}s of {saved_world} ranks"
            )
        return [p for _, _, p in saved]

    @classmethod
    def restore(
        cls,
        directory: str | Path,
        path: str | Path,
        max_sequence_length: int,
        rank: int = 0,
        world_size: int = 1,
        cache_mib: int = 16,
        links: Sequence[str | Path] = (),
    ) -> UserStore:
        """The store as :meth:`checkpoint` left it in ``directory``, in the working file
        ``path``. Saved by another number of ranks: every snapshot is read and this rank
        keeps its users.

        ``links``: a delta checkpoint's chain (the folders before ``directory``, its full
        snapshot first, then its deltas in order): the snapshot of ``links[0]``, then the
        deltas of ``links[1:]`` and of ``directory``, each one's written users replacing
        theirs and its deleted users removed."""
        folders = [Path(p) for p in links] + [Path(directory)]
        snapshots = cls._files(folders[0], _SNAPSHOT_RE, "snapshot")
        deltas = [cls._files(folder, _DELTA_RE, "delta") for folder in folders[1:]]
        formats = [cls._check_meta(p, max_sequence_length) for p in snapshots]
        for p in [p for files in deltas for p in files]:
            cls._check_meta(p, max_sequence_length)
        store = cls(path, max_sequence_length, rank, world_size, cache_mib)
        saved_world = len(snapshots)
        if saved_world == world_size and formats[rank] == FORMAT:
            src = sqlite3.connect(snapshots[rank])
            try:
                src.backup(store._conn)
            finally:
                src.close()
        else:
            logger.info("user store: reading %d ranks' snapshots (format %s) for rank %d of %d",
                        saved_world, formats, rank, world_size)
            for p, fmt in zip(snapshots, formats):
                store._copy_rows(p, fmt)
        for files in deltas:
            # the deltas of the same world as this run: this rank's file only
            mine = [files[rank]] if len(files) == world_size else files
            for p in mine:
                store._copy_rows(p, FORMAT, delta=True)
        store.clear_changes()
        return store

    def _copy_rows(self, source: Path, fmt: int, delta: bool = False) -> None:
        """The rows of this rank's users in the snapshot or delta ``source`` (of format
        ``fmt``) into the store; a delta's rows replace theirs, and the users its ``deleted``
        table names are removed."""
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            rows = src.execute(
                "SELECT user, n, items, timestamps, ratings"
                + (", last" if fmt >= 2 else "") + " FROM history WHERE user % ? = ?",
                (self.world_size, self.rank),
            )
            if fmt < 2:  # each user's newest event time (format 1 did not store it)
                rows = ((*row, int(np.frombuffer(row[3][-8:], "<i8")[0]) if row[3] else 0)
                        for row in rows)
            verb = "INSERT OR REPLACE" if delta else "INSERT"
            tails: list[tuple] = []
            if delta and "tail" in {c[1] for c in src.execute("PRAGMA table_info(history)")}:
                rows = src.execute(
                    "SELECT user, n, items, timestamps, ratings, last, tail FROM history "
                    "WHERE user % ? = ?", (self.world_size, self.rank)).fetchall()
                tails = [row[:6] for row in rows if row[6]]
                rows = [row[:6] for row in rows if not row[6]]
            with self._conn:
                self._conn.executemany(f"{verb} INTO history VALUES (?, ?, ?, ?, ?, ?)", rows)
                if tails:
                    self._append_tails(source, tails)
                if delta:
                    gone = src.execute("SELECT user FROM deleted WHERE user % ? = ?",
                                       (self.world_size, self.rank))
                    self._conn.executemany("DELETE FROM history WHERE user = ?", gone)
        except sqlite3.DatabaseError as exc:
            raise DataError(str(source), f"cannot read the user store rows ({exc})") from None
        finally:
            src.close()

    def _append_tails(self, source: Path, tails: list[tuple]) -> None:
        """A delta's appended events (rows ``(user, k, items, timestamps, ratings, last)``)
        after their users' stored events, the newest max_sequence_length kept."""
        stored = self._fetch(np.asarray([row[0] for row in tails], np.int64))
        out = []
        for user, k, *blobs, last in tails:
            if user not in stored:
                raise DataError(str(source), f"user {user}: appended events for a user the "
                                "checkpoints before it do not hold (a chain out of order?)")
            keep = 8 * min(len(stored[user][0]) // 8 + k, self.max_sequence_length)
            joined = [(old + new)[-keep:] for old, new in zip(stored[user], blobs)]
            out.append((user, keep // 8, *joined, last))
        self._conn.executemany("INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?, ?, ?)", out)

    @staticmethod
    def _check_meta(path: Path, max_sequence_length: int) -> int:
        """The snapshot's format, after checking it can be read with ``max_sequence_length``."""
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta"))
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            raise DataError(str(path), f"not a user store snapshot ({exc})") from None
        if meta.get("format") not in ("1", str(FORMAT)):
            raise DataError(
                str(path), f"user store format {meta.get('format')}, this code reads 1 to {FORMAT}"
            )
        saved = int(meta["max_sequence_length"])
        if saved != max_sequence_length:
            raise DataError(
                str(path),
                f"saved with max_sequence_length {saved}, this run has {max_sequence_length}",
                field="max_sequence_length",
            )
        return int(meta["format"])


__all__ = ["DELTA", "SNAPSHOT", "Histories", "Sequences", "UserStore", "owner"]
