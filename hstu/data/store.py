"""A preprocessed dataset as flat arrays, memory-mapped from a layout derived once per node
(docs/data.md, "Loaded layout": where it is written, its key, locking, the cache folder).

The first load derives from ``sequences.parquet`` (one row per user) a folder of ``.npy``
files:

    offsets.npy     int64 [U+1]   user u owns rows offsets[u]:offsets[u+1]
    items.npy       int32 [N]     (int64 where num_items does not fit in int32)
    timestamps.npy  int64 [N]
    actions.npy     int32 [N]     (when the dataset has actions; int64 where they do not fit)
    ctx-<i>.npy     int64 [U]     the i-th contextual feature of manifest.json
    manifest.json   key, source, counts, names

Every process maps these files read-only (``np.load(mmap_mode="r")``), so the ranks of a node
share their pages and a rank holds no copy of the dataset.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hstu.data.errors import DataError
from hstu.data.layout import (
    CACHE_ENV,
    MAPPED_MANIFEST,
    MAPPED_PREFIX,
    MAPPED_VERSION,
    METADATA_FILE,
    SEQUENCES_FILE,
    read_metadata,
)

_OPEN: weakref.WeakValueDictionary[Path, SequenceStore] = weakref.WeakValueDictionary()
"""The stores this process has mapped, by layout folder (while in use)."""
_FOOTER_BYTES = 1 << 16  # the parquet footer (schema, row groups, chunk sizes and statistics)
_INT32_MAX = np.iinfo(np.int32).max


@dataclass
class SequenceStore:
    """All users' sequences, concatenated. Legend: U users, N interactions, X contextual features.

    offsets int64 [U+1] (user u owns rows offsets[u]:offsets[u+1]); items int32 or int64 [N]
    (int32 where the item ids fit); timestamps int64 [N]; actions int32 or int64 [N] or None;
    contextual: name -> int64 [U]. From :meth:`load` these are read-only memory maps: index
    them (``items[rows]``), never copy them whole; cast what you gather to int64.
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    actions: np.ndarray | None
    contextual: dict[str, np.ndarray]
    metadata: dict[str, Any]
    folder: Path | None = field(default=None, compare=False)
    """The mapped layout's folder (None for a store built in memory)."""

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def load(
        cls, path: str | Path, *, cache_dir: str | Path | None = None, verbose: bool = True
    ) -> SequenceStore:
        """Maps the dataset folder ``path`` (writing its mapped layout first if this node has
        none). ``cache_dir``: where the layout goes if ``path`` is not writable (default
        ``$HSTU_DATA_CACHE``, else ``~/.cache/hstu``); ``verbose``: print where it went."""
        path = Path(path)
        metadata = read_metadata(path)
        folder = mapped_layout(path, metadata, cache_dir=cache_dir, verbose=verbose)
        # one mapping per process: a second load (the test split's loader) shares the first
        # store's maps, whose touched pages would otherwise count twice in the resident size
        store = _OPEN.get(folder)
        if store is None:
            store = cls.open_mapped(folder, metadata)
            _OPEN[folder] = store
        return store

    @classmethod
    def open_mapped(cls, folder: Path, metadata: dict[str, Any]) -> SequenceStore:
        """The store of a mapped layout folder (written by :func:`mapped_layout`)."""
        try:
            manifest = json.loads((folder / MAPPED_MANIFEST).read_text())
            arrays = {
                name: np.load(folder / f"{name}.npy", mmap_mode="r")
                for name in ["offsets", "items", "timestamps"]
                + (["actions"] if manifest["has_actions"] else [])
                + [f"ctx-{i}" for i in range(len(manifest["contextual"]))]
            }
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(
                str(folder), f"incomplete mapped layout ({exc}); remove this folder to rewrite it"
            ) from None
        n = int(arrays["offsets"][-1])
        u = len(arrays["offsets"]) - 1
        per_event = ("items", "timestamps", "actions")
        bad = [k for k, a in arrays.items() if k in per_event and len(a) != n]
        bad += [k for k, a in arrays.items() if k.startswith("ctx-") and len(a) != u]
        if bad or n != manifest["num_interactions"] or u != manifest["num_users"]:
            raise DataError(
                str(folder), f"inconsistent mapped layout ({', '.join(bad) or 'counts'}); "
                "remove this folder to rewrite it",
            )
        contextual = {name: arrays[f"ctx-{i}"] for i, name in enumerate(manifest["contextual"])}
        return cls(
            arrays["offsets"], arrays["items"], arrays["timestamps"], arrays.get("actions"),
            contextual, metadata, folder,
        )


# ------------------------------------------------------------------------ the mapped layout
def layout_key(path: Path) -> str:
    """Key of the dataset folder's content: the parquet file's size, modification time and
    footer, metadata.json, and the layout version."""
    seq = path / SEQUENCES_FILE
    try:
        stat = seq.stat()
        with open(seq, "rb") as f:
            f.seek(max(0, stat.st_size - _FOOTER_BYTES))
            footer = f.read()
        meta = (path / METADATA_FILE).read_bytes()
    except OSError as exc:
        raise DataError(str(seq), f"unreadable ({exc})") from None
    key = f"mapped v{MAPPED_VERSION} {stat.st_size} {stat.st_mtime_ns}\n".encode()
    return hashlib.sha256(key + footer + meta).hexdigest()[:24]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where mapped layouts of read-only dataset folders go."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "hstu"


def mapped_layout(
    path: Path, metadata: dict[str, Any], *, cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> Path:
    """The folder of the dataset's mapped layout, written first if absent (by one process of
    the node; the others wait on its lock file and then map it)."""
    key = layout_key(path)
    name = f"{MAPPED_PREFIX}{key}"
    target = path / name
    if target.is_dir():
        return target
    lock = _open_lock(path / f"{name}.lock")
    if lock is None:  # read-only dataset folder
        root = cache_root(cache_dir)
        target = root / f"{path.name}{name}"
        if verbose:
            print(f"[hstu] {path} is not writable: its mapped layout is {target} "
                  f"(set {CACHE_ENV} to place it elsewhere)", flush=True)
        if target.is_dir():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                str(root), f"cannot create the cache folder ({exc}); set {CACHE_ENV}"
            ) from None
        lock = _open_lock(root / f"{target.name}.lock")
        if lock is None:
            raise DataError(str(root), f"not writable: set {CACHE_ENV} to a writable folder")
    with lock:
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if verbose:
                    print(f"[hstu] waiting for another process writing {target}", flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. a network file system without locks
            raise DataError(
                lock.name, f"cannot lock ({exc}); the mapped layout needs file locks"
            ) from None
        if not target.is_dir():
            start = time.perf_counter()
            write_layout(path, target, metadata)
            print(f"[hstu] wrote the mapped layout of {path} to {target} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            if target.parent == path:
                _remove_stale(path, keep=target.name)
    return target


def _open_lock(lock_path: Path) -> IO[bytes] | None:
    """The open lock file, or None where its folder is not writable."""
    if not os.access(lock_path.parent, os.W_OK):
        return None
    try:
        return open(lock_path, "ab")
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise DataError(str(lock_path), f"cannot create the lock file ({exc})") from None


def _remove_stale(path: Path, keep: str) -> None:
    """Removes the dataset folder's mapped layouts of earlier contents (a process still
    mapping one keeps its pages) and their lock files where no process holds them."""
    for old in path.glob(f"{MAPPED_PREFIX}*"):
        if old.name in (keep, f"{keep}.lock") or ".tmp-" in old.name:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.name.endswith(".lock"):
            with open(old, "ab") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                old.unlink(missing_ok=True)


def write_layout(path: Path, target: Path, metadata: dict[str, Any]) -> None:
    """Writes the mapped layout of ``path``'s sequences.parquet to ``target`` (through a
    temporary sibling folder renamed into place), a few thousand users of one column at a time."""
    seq = path / SEQUENCES_FILE
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_arrays(seq, tmp, metadata)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # written meanwhile by a process elsewhere
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_BATCH_USERS = 4096  # users per record batch read while writing the layout


def _write_arrays(seq: Path, out: Path, metadata: dict[str, Any]) -> None:
    try:
        pf = pq.ParquetFile(seq)
        names = pf.schema_arrow.names
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataError(str(seq), f"unreadable ({exc})") from None
    contextual = list(metadata["contextual_feature_names"])
    missing = [c for c in ["item_ids", "timestamps", *contextual] if c not in names]
    if missing:
        raise DataError(str(seq), f"unreadable (no column {', '.join(missing)})")
    has_actions = "actions" in names
    num_users = pf.metadata.num_rows
    num_rows = int(metadata.get("num_interactions", -1))
    if num_rows < 0:
        raise DataError(
            str(seq.parent / METADATA_FILE), "no num_interactions", field="num_interactions"
        )
    item_dtype = np.int32 if int(metadata["num_items"]) <= _INT32_MAX else np.int64
    nav = metadata.get("num_action_values")
    action_dtype = np.int32 if nav is not None and int(nav) <= _INT32_MAX else np.int64
    lists = [("items", "item_ids", item_dtype), ("timestamps", "timestamps", np.int64)]
    if has_actions:
        lists.append(("actions", "actions", action_dtype))
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    for key, column, dtype in lists:
        with open(out / f"{key}.npy", "wb") as target:
            # plain appends, not a writable map: written pages never count in this process
            np.lib.format.write_array_header_1_0(
                target, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (num_rows,)}
            )
            user = 0
            for local, values in _read_lists(pf, seq, column):
                rows = len(local) - 1
                if key == "items":
                    pos = int(offsets[user])
                    if pos + int(local[-1]) > num_rows:
                        raise DataError(
                            str(seq),
                            f"more interactions than metadata.json's num_interactions {num_rows}",
                            field=column,
                        )
                    offsets[user + 1 : user + rows + 1] = pos + local[1:]
                elif not np.array_equal(local, offsets[user : user + rows + 1] - offsets[user]):
                    raise DataError(str(seq), "list lengths differ from item_ids'", field=column)
                if key == "timestamps":
                    _check_timestamps(seq, local, values, first_user=user)
                target.write(_cast(values, dtype, seq, column).tobytes())
                user += rows
        if key == "items" and int(offsets[-1]) != num_rows:
            raise DataError(
                str(seq), f"{int(offsets[-1])} interactions, metadata.json's num_interactions says "
                f"{num_rows}", field=column,
            )
    np.save(out / "offsets.npy", offsets)
    for i, name in enumerate(contextual):
        try:
            col = pf.read(columns=[name]).column(0).to_numpy()
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DataError(str(seq), f"unreadable ({exc})", field=name) from None
        np.save(out / f"ctx-{i}.npy", col.astype(np.int64))
    manifest = {
        "mapped_version": MAPPED_VERSION,
        "source": str(seq.resolve()),
        "num_users": num_users,
        "num_interactions": num_rows,
        "has_actions": has_actions,
        "contextual": contextual,
    }
    (out / MAPPED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    pa.default_memory_pool().release_unused()  # the reader's buffers back to the system


def _read_lists(
    pf: pq.ParquetFile, seq: Path, column: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(offsets int64 [rows+1] from 0, values [sum]) of a list column, a few thousand users at
    a time."""
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_USERS, columns=[column]):
            col = batch.column(0)
            if col.null_count:
                raise DataError(str(seq), f"{col.null_count} null lists", field=column)
            offs = col.offsets.to_numpy().astype(np.int64)
            yield offs - offs[0], col.flatten().to_numpy()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataError(str(seq), f"unreadable ({exc})", field=column) from None


def _cast(values: np.ndarray, dtype: Any, seq: Path, column: str) -> np.ndarray:
    """``values`` as ``dtype``, refused where they do not fit (never wrapped)."""
    narrow = values.size and np.dtype(dtype) == np.int32
    if narrow and (values.min() < 0 or values.max() > _INT32_MAX):
        raise DataError(
            str(seq), f"values outside [0, {_INT32_MAX}] while metadata.json's count fits int32",
            field=column,
        )
    return values.astype(dtype, copy=False)


def _check_timestamps(
    path: Path, offsets: np.ndarray, timestamps: np.ndarray, first_user: int = 0
) -> None:
    """Refuses negative timestamps and sequences that go back in time (counted); ``offsets``
    from 0, the users ``first_user``... of the file."""
    negative = int((timestamps < 0).sum())
    steps = np.diff(timestamps)
    back = np.zeros(len(steps) + 1, dtype=bool)
    back[1:] = steps < 0
    # a user's first interaction has no predecessor
    back[offsets[:-1][offsets[:-1] < len(back)]] = False
    users = np.unique(np.searchsorted(offsets, np.flatnonzero(back), side="right") - 1)
    if negative or len(users):
        raise DataError(
            str(path),
            f"{negative} negative timestamps, {len(users)} users whose timestamps go back in time"
            + (f" (first: user row {int(users[0]) + first_user})" if len(users) else "")
            + "; sequences must be sorted by time: rerun python -m hstu.data.preprocess --force",
            field="timestamps",
        )


__all__ = ["SequenceStore", "cache_root", "layout_key", "mapped_layout"]
