"""Checkpoint files: how one checkpoint is written, checked and read (all ranks call these).

The layout of ``<root>/iter_<step>/``: docs/training.md, "Checkpoints and resuming";
``manifest.json`` (size and CRC32 of every other file, digested as they are written) is
written last: a folder without it was never completed. Everything is written into
``iter_<step>.tmp``, fsynced, then renamed into place and ``latest`` replaced atomically. A
folder of the same step is moved aside to ``iter_<step>.old`` only once its replacement is
complete: a complete checkpoint is never deleted before the one replacing it is complete.
Which checkpoints to keep, resume from or prune is :mod:`hstu.training.lifecycle`'s business;
what goes into them, :mod:`hstu.training.checkpoint_manager`'s.

Every problem is raised as :class:`CheckpointError` (one line naming the file), the same on
every rank.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from hstu.training.distributed import barrier, gather_objects, rank_and_world

LATEST = "latest"
MANIFEST = "manifest.json"
# the tables' weight average (TrainerArgs.ema_decay, hstu.training.ema) is saved under this
# key of the sharded state; it is optional to a load
EMA_TABLES_KEY = "embeddings_ema"
EMA_PREFIX = EMA_TABLES_KEY + "."
# online training's row deltas: each rank's touched table rows (hstu.embeddings.row_deltas)
ROWS_PREFIX = "table_rows.rank"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read: one line naming the file and what to do."""


@dataclass(frozen=True)
class RankPlace:
    """Where this process sits: which of the checkpoint's files it writes and reads."""

    rank: int = 0
    tp_rank: int = 0
    dp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def of(cls, env: Any) -> RankPlace:
        """From a :class:`hstu.training.distributed.DistEnv`."""
        return cls(env.rank, env.tp_rank, env.dp_rank, env.tp_size)


@dataclass
class CheckpointState:
    """What one rank writes into (or read from) one checkpoint.

    ``sharded``: the DCP part (every rank its shards); ``dense``: this TP rank's
    ``dense_tp<r>.pt`` (written by data-parallel rank 0); ``meta``: ``meta.pt`` (written by
    rank 0; holds ``step``); ``rng``: this rank's ``rng_rank<r>.pt`` (None on a load when
    this rank did not exist in the saved run).
    """

    sharded: dict[str, Any]
    dense: dict[str, Any]
    meta: dict[str, Any]
    rng: dict[str, Any] | None
    extra: Callable[[str], list[str]] | None = None
    """Writes this rank's further files into the checkpoint folder being written (its
    argument) and returns their names: they are in the manifest and are published with the
    rest (online training's stream position, id maps and user store)."""
    needs: dict[str, int] | None = None
    """The checkpoint folders (names of siblings under the same root) this one cannot be
    restored without, each with the CRC32 of its manifest (online training's delta
    checkpoints: their base and the deltas before them); written into the manifest as
    ``needs``: pruning keeps them, a resume checks them (:func:`chain_problem`)."""
    table_rows: dict[str, Any] | None = None
    """Online training's row deltas: this rank's rows of the tables touched since the
    checkpoint before (:func:`hstu.embeddings.row_deltas.touched_entries`), written as
    ``table_rows.rank<r>.pt``; the tables' entries are then left out of ``sharded`` and the
    checkpoint is restored with its chain (:func:`table_links`)."""


# ----------------------------------------------------------------------------- helpers
def agree(problem: str | None, name_rank: bool = True) -> None:
    """Raises CheckpointError on every rank if any rank has a problem (the lowest rank's)."""
    problems = gather_objects(problem)
    for rank, p in enumerate(problems):
        if p is not None:
            named = name_rank and len(problems) > 1 and "rank " not in p
            raise CheckpointError(p + (f" (rank {rank})" if named else ""))


def describe_os_error(exc: BaseException, path: str | None = None) -> str:
    """One line for an OSError (disk full, read-only, permission) naming the file."""
    if isinstance(exc, CheckpointException):
        inner = [e for e, _ in exc.failures.values()]
        return describe_os_error(inner[0], path) if inner else "torch.distributed.checkpoint failed"
    name = getattr(exc, "filename", None) or path or "?"
    if isinstance(exc, OSError) and exc.errno is not None:
        free = "free space or lower TrainerArgs.keep_last_n"
        writable = "point TrainerArgs.ckpt_save_dir at a writable folder"
        hint = {
            errno.ENOSPC: f"no space left on the device: {free}",
            errno.EDQUOT: f"disk quota exceeded: {free}",
            errno.EROFS: f"read-only file system: {writable}",
            errno.EACCES: f"permission denied: {writable}",
            errno.EPERM: f"permission denied: {writable}",
        }.get(exc.errno, exc.strerror or str(exc))
        return f"{name}: {hint} ({errno.errorcode.get(exc.errno, exc.errno)})"
    text = " ".join(str(exc).split())
    return f"{name}: {type(exc).__name__}: {text[:300]}"


def state_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested state (the local shards of ShardedTensors)."""
    if hasattr(obj, "local_shards"):  # a ShardedTensor (also a torch.Tensor)
        return [s.tensor for s in obj.local_shards()]
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in state_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in state_tensors(v)]
    return []


def state_bytes(*states: Any) -> int:
    """Bytes of the tensors in ``states``: what their files hold at least."""
    return sum(t.numel() * t.element_size() for s in states for t in state_tensors(s))


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def no_space_line(path: str, need: int, free: int, when: str = "") -> str:
    """The one line of a full disk, with the numbers (torch's zip writer loses the errno)."""
    mb = 1024 * 1024
    return (
        f"{path}: no space left on {_mount_point(path)}: need ~{need / mb:,.1f} MB, "
        f"{free / mb:,.1f} MB free{when}: free space or lower TrainerArgs.keep_last_n (ENOSPC)"
    )


# a write failing with less than this left on its file system is taken for a full disk
_FULL_BELOW = 4 * 1024 * 1024


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Makes renames and new entries in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _crc32(path: str, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


_Digests = dict[str, dict[str, int]]
"""Absolute path -> size and CRC32 of a file this process wrote, taken from the bytes as they
are written (no file is read back). DCP may write from several threads: each touches only its
own files' keys, and a dict's single operations are atomic."""


class _DigestingWriter(io.RawIOBase):
    """A binary file opened for writing that keeps the running size and CRC32 of what is
    written through it (recorded in ``digests`` at close). Seeking is refused: a digest of
    a stream is only the file's when nothing is written twice."""

    def __init__(self, path: str, digests: _Digests) -> None:
        super().__init__()
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._path, self._digests = path, digests
        self._size = self._crc = 0

    @property
    def name(self) -> str:
        """The file's path (as a file object's ``name``)."""
        return self._path

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self._fh.write(view)
        if written != len(view):  # a buffered file writes all or raises
            raise OSError(errno.EIO, f"short write ({written} of {len(view)} bytes)", self._path)
        self._crc = zlib.crc32(view, self._crc)
        self._size += written
        return written

    def tell(self) -> int:
        return self._size

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fh.fileno()

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._fh.close()
        finally:
            super().close()
        self._digests[os.path.abspath(self._path)] = {"size": self._size, "crc32": self._crc}


class _DigestingFileSystem(FileSystem):
    """DCP's local file system, its written files digested as they are written."""

    def __init__(self, digests: _Digests) -> None:
        super().__init__()
        self.digests = digests

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = _DigestingWriter(os.fspath(path), self.digests)
        try:
            yield stream
        finally:
            stream.close()

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        entry = self.digests.pop(os.path.abspath(path), None)
        if entry is not None:
            self.digests[os.path.abspath(new_path)] = entry


def describe_written_files(
    folder: str, names: list[str], digests: _Digests | None = None
) -> dict[str, dict[str, int]]:
    """Size and CRC32 of each file, fsynced: a checkpoint's own files as ``digests`` took them
    while they were written; files other writers made (an export's artifact: torch.export,
    parquet; online training's extras) read back once each."""
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        _fsync_file(path)
        size = os.path.getsize(path)
        if digests is None:
            out[name] = {"size": size, "crc32": _crc32(path)}
            continue
        entry = digests.get(os.path.abspath(path))
        assert entry is not None, f"{path}: written without a digesting writer"
        if size != entry["size"]:
            raise OSError(errno.EIO, f"{size} bytes on disk, {entry['size']} written", path)
        out[name] = dict(entry)
    return out


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def step_of(name: str) -> int | None:
    """``iter_<step>`` -> step; None for anything else."""
    digits = name.removeprefix("iter_")
    return int(digits) if name.startswith("iter_") and digits.isdigit() else None


PIN = ".pin-"
"""``<checkpoint folder>.pin-<pid>`` beside a checkpoint: a reader (a publisher exporting it)
holds it; pruning keeps it while that process lives (:func:`pinned_folders`)."""


@contextmanager
def pin(folder: str) -> Iterator[None]:
    """Keeps the checkpoint ``folder`` from being pruned while the block runs (a file of this
    process beside it; a process killed inside leaves a pin that pruning finds dead and removes)."""
    path = f"{os.path.normpath(folder)}{PIN}{os.getpid()}"
    with open(path, "w"):
        pass
    try:
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def pinned_folders(root: str) -> list[str]:
    """The checkpoint folders under ``root`` that a live process holds (:func:`pin`); pins
    of processes that are gone are removed."""
    held = []
    for name in sorted(os.listdir(root)):
        folder, sep, pid = name.rpartition(PIN)
        if not sep or not pid.isdigit():
            continue
        if _alive(int(pid)):
            held.append(os.path.join(root, folder))
        else:
            try:
                os.remove(os.path.join(root, name))
            except FileNotFoundError:
                pass
    return held


# ------------------------------------------------------------------------------ saving
def save_checkpoint(root: str, step: int, state: CheckpointState, place: RankPlace) -> str:
    """Writes one checkpoint (see the module docstring); all ranks call it. Returns the final
    directory. On any rank's failure every rank raises the same CheckpointError and the
    checkpoints already there are untouched (the partial ``.tmp`` folder is removed)."""
    final = os.path.join(root, f"iter_{step}")
    tmp = final + ".tmp"
    problem = None
    rank = place.rank
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as exc:
            problem = (
                f"step {step}: cannot create the checkpoint folder {describe_os_error(exc, tmp)}"
            )
    agree(problem)
    try:
        _write_files(tmp, state, place)
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise
    if rank == 0:
        try:
            _swap_into_place(tmp, final)
            write_text_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
        except OSError as exc:
            problem = f"step {step}: cannot publish the checkpoint: {describe_os_error(exc)}"
    agree(problem)
    return final


def _write_files(tmp: str, state: CheckpointState, place: RankPlace) -> None:
    meta, rng, rank = state.meta, state.rng, place.rank
    step = meta.get("step", "?")
    problem = None
    # free space before writing: every rank's files land under one checkpoint folder
    need = state_bytes(state.sharded, rng, state.table_rows)
    need += state_bytes(state.dense) if place.dp_rank == 0 else 0
    need = sum(gather_objects(need))
    free = shutil.disk_usage(tmp).free
    if rank == 0 and need > free:
        problem = f"step {step}: cannot write checkpoint files: {no_space_line(tmp, need, free)}"
    agree(problem)

    def failed(exc: BaseException, path: str | None = None) -> str:
        """describe_os_error, or the full-disk line where the writer lost the errno."""
        errno_known = isinstance(exc, OSError) and exc.errno not in (None, errno.EIO)
        if not errno_known and shutil.disk_usage(tmp).free < _FULL_BELOW:
            return no_space_line(path or tmp, need, free, " before the save")
        return describe_os_error(exc, path)

    digests: _Digests = {}
    try:
        writer = dcp.FileSystemWriter(tmp)
        writer.fs = _DigestingFileSystem(digests)
        dcp.save(state.sharded, storage_writer=writer)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's is a BaseException
        if isinstance(exc, CheckpointException) and exc.failures:
            exc = next(iter(exc.failures.values()))[0]  # a rank's own error
        problem = f"step {step}: cannot write checkpoint files: {failed(exc, tmp)}"
    mine: list[str] = []
    if problem is None:
        writes: list[tuple[str, Any]] = [(f"rng_rank{rank}.pt", rng)]
        if state.table_rows is not None:
            writes.append((f"{ROWS_PREFIX}{rank}.pt", state.table_rows))
        if place.dp_rank == 0:
            writes.append((f"dense_tp{place.tp_rank}.pt", state.dense))
        if rank == 0:
            writes.append(("meta.pt", meta))
        try:
            for name, obj in writes:
                path = os.path.join(tmp, name)
                try:
                    with _DigestingWriter(path, digests) as fh:
                        torch.save(obj, fh)
                except RuntimeError as exc:  # torch.save wraps the OSError of a short write
                    raise OSError(errno.EIO, " ".join(str(exc).split()), path) from exc
                mine.append(name)
            shards = glob.glob(os.path.join(tmp, f"__{rank}_*.distcp"))
            mine += [os.path.basename(p) for p in shards]
            if rank == 0:
                mine.append(".metadata")
            files = describe_written_files(tmp, mine, digests)
            if state.extra is not None:
                files.update(describe_written_files(tmp, state.extra(tmp)))
        except OSError as exc:
            problem = f"step {step}: cannot write checkpoint file {failed(exc)}"
    agree(problem)
    gathered = gather_objects(files)
    if rank == 0:
        manifest = {"step": meta.get("step"), "world_size": len(gathered), "files": {}}
        if state.needs:
            manifest["needs"] = dict(state.needs)
        for part in gathered:
            manifest["files"].update(part)
        try:
            text = json.dumps(manifest, indent=1, sort_keys=True)
            write_text_atomic(os.path.join(tmp, MANIFEST), text)
            fsync_dir(tmp)
        except OSError as exc:
            problem = f"step {step}: cannot write checkpoint file {describe_os_error(exc)}"
    agree(problem)


def _swap_into_place(tmp: str, final: str) -> None:
    """Renames the complete ``tmp`` to ``final``; an older complete ``final`` is moved aside
    first and removed only after the rename (see :func:`checkpoint_folders` for the window)."""
    root = os.path.dirname(final)
    old = final + ".old"
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- checking
def manifest_of(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, MANIFEST)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def check_files(folder: str, checksums: bool = True, names: list[str] | None = None) -> str | None:
    """The first problem of ``folder`` against its manifest (missing, truncated or changed
    file), or None. Only ``names`` (of the manifest) when given."""
    manifest = manifest_of(folder)
    if manifest is None:
        if os.path.isfile(os.path.join(folder, "meta.pt")):
            return None  # written before manifests existed: nothing to check against
        return f"{folder}: not a complete checkpoint (no {MANIFEST})"
    for name, want in sorted(manifest["files"].items()):
        if names is not None and name not in names:
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path}: missing (the manifest lists it)"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{path}: {size} bytes, the manifest says {want['size']} (truncated or damaged)"
        if checksums and _crc32(path) != want["crc32"]:
            return f"{path}: checksum differs from the manifest (damaged)"
    return None


def manifest_crc(folder: str) -> int:
    """CRC32 of ``folder``'s manifest.json (what a checkpoint that needs it records)."""
    return _crc32(os.path.join(folder, MANIFEST))


def needed(folder: str) -> list[str]:
    """The sibling folders ``folder``'s manifest says it needs (paths, lowest step first: the
    manifest's JSON keeps its keys sorted as text, where ``iter_100`` comes before ``iter_90``)."""
    manifest = manifest_of(folder) or {}
    names = list(manifest.get("needs", {}))
    odd = [n for n in names if step_of(n) is None]
    if odd:
        raise CheckpointError(f"{os.path.join(folder, MANIFEST)}: needs {odd[0]!r}, not an "
                              "iter_<step> folder")
    return [os.path.join(os.path.dirname(folder), n) for n in sorted(names, key=step_of)]


def chain_problem(folder: str, checksums: bool = True) -> str | None:
    """The first problem of the checkpoints ``folder`` needs (its manifest's ``needs``): a
    link missing, replaced by another save of the same step, or whose files do not match
    its manifest; None when every link is whole. Local (no collectives)."""
    manifest = manifest_of(folder) or {}
    for name, crc in manifest.get("needs", {}).items():
        link = os.path.join(os.path.dirname(folder), name)
        if manifest_of(link) is None:
            return f"{link}: missing or incomplete (a link of the chain of {folder})"
        if manifest_crc(link) != crc:
            return (f"{link}: not the checkpoint {folder} was written on (saved again since; a "
                    "link of its chain)")
        problem = check_files(link, checksums)
        if problem is not None:
            return f"{problem} (a link of the chain of {folder})"
    return None


def row_files(folder: str) -> list[str]:
    """The row delta files of ``folder`` (every rank's; none when its tables are whole)."""
    manifest = manifest_of(folder) or {"files": {}}
    return sorted(os.path.join(folder, n) for n in manifest["files"] if n.startswith(ROWS_PREFIX))


def table_links(folder: str) -> tuple[str, list[str]] | None:
    """None when ``folder`` holds its tables whole; else (the checkpoint of its chain whose DCP
    files hold them whole, the row deltas after it up to ``folder``, in order). Local."""
    links = [*needed(folder), folder]
    deltas: list[str] = []
    while links and row_files(links[-1]):
        deltas.insert(0, links.pop())
    if not deltas:
        return None
    if not links:
        raise CheckpointError(f"{folder}: a row delta whose chain holds no whole tables")
    return links[-1], deltas


def read_rows(folder: str) -> list[dict[str, Any]]:
    """Every rank's row delta file of ``folder`` (collective)."""
    return _read_agreed(row_files(folder))


def verify(folder: str, checksums: bool = True) -> None:
    """Collective: the ranks share the files of the manifest; raises the first problem."""
    manifest = manifest_of(folder)
    if manifest is None:
        problem = check_files(folder)
    else:
        names = sorted(manifest["files"])
        rank, world = rank_and_world()
        problem = check_files(folder, checksums, names[rank::world])
    agree(problem, name_rank=False)


def checkpoint_folders(root: str) -> list[str]:
    """The ``iter_<n>`` folders under ``root``, and the ``iter_<n>.old`` a same-step save left
    if killed between its two renames: highest step first, ``iter_<n>`` before its ``.old``."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        step = step_of(name.removesuffix(".old"))
        path = os.path.join(root, name)
        if step is not None and os.path.isdir(path):
            found.append((step, not name.endswith(".old"), path))
    return [path for _, _, path in sorted(found, reverse=True)]


def newest_complete(root: str) -> str | None:
    """The complete checkpoint (sizes only) of the highest step under ``root``
    (:func:`checkpoint_folders`); None if none. Local (no collectives)."""
    for path in checkpoint_folders(root):
        if check_files(path, checksums=False) is None:
            return path
    return None


def is_checkpoint_dir(path: str) -> bool:
    """A checkpoint folder itself (not a root holding them)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("meta.pt", MANIFEST))


def resolve_checkpoint_dir(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest complete one under it."""
    if is_checkpoint_dir(path):
        return path
    found = newest_complete(path)
    if found is not None:
        return found
    raise CheckpointError(
        f"TrainerArgs.ckpt_load_dir={path!r}: no complete checkpoint there (no iter_<step> folder "
        'with a manifest); use "auto" to start fresh when there is none'
    )


# ------------------------------------------------------------------------------ loading
def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _read(path: str) -> Any:
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file: say which
        raise CheckpointError(f"{path}: cannot be read ({_one_line(exc)})") from None


def _global_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.size())
    size = getattr(value, "size", None)
    return tuple(size()) if callable(size) else None


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as DCP stores them (keys joined with '.')."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def model_keys(sharded_state: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """Every key of the model's sharded state with its global shape, the union over all ranks
    (collective): a rank holds the fused optimizer state (``optim.<table>...``) of its own
    tables and column shards only; the union is the set DCP writes into ``.metadata``."""
    mine = {key: _global_shape(value) for key, value in _flatten(sharded_state).items()}
    union: dict[str, tuple[int, ...] | None] = {}
    for part in gather_objects(mine):
        for key, shape in part.items():
            if union.get(key) is None:
                union[key] = shape
    return union


def dynamic_state_hint(key: str) -> str:
    """What a mismatch of ``key`` means when it is a dynamic table's state (its remapper or
    admission sketch): the table's settings differ from the checkpoint's, not its data."""
    if ".remappers." not in key:
        return ""
    return (" (a dynamic table's state: its capacity, admission (DynamicEmbeddingArgs."
            "admit_min_count > 1 keeps one row of the capacity for ids not admitted, and a count "
            "sketch) and eviction must be those it was saved with)")


def check_sharded_keys(
    ckpt: str, have: dict[str, tuple[int, ...] | None], allow_unused: bool = False
) -> str | None:
    """A key of this model (``have``: :func:`model_keys`, the union over the ranks) missing
    from the checkpoint or the reverse, or a global shape that differs: the first such,
    naming the key."""
    try:
        saved = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001
        return f"{os.path.join(ckpt, '.metadata')}: cannot be read ({_one_line(exc)})"
    for key, shape in sorted(have.items()):
        if key not in saved:
            return (f"{ckpt}: this model has {key}, the checkpoint does not "
                    + (dynamic_state_hint(key).strip() or "(a different table set?)"))
        want = getattr(saved[key], "size", None)
        if want is not None and shape is not None and tuple(want) != tuple(shape):
            hint = dynamic_state_hint(key)
            if ".optim." in key:  # e.g. rowwise_adagrad: one entry per row and column block
                hint = (
                    " (a column_wise table keeps its row-wise optimizer state per column block: "
                    "load it with the sharding_override and dim it was saved with)"
                )
            return (
                f"{ckpt}: {key} is {list(want)} in the checkpoint, {list(shape)} in this "
                f"model{hint}"
            )
    # the weight average (TrainerArgs.ema_decay) is optional to a load
    extra = sorted(k for k in set(saved) - set(have) if not k.startswith(EMA_PREFIX))
    if extra and not allow_unused:
        return (f"{ckpt}: the checkpoint has {extra[0]}, this model does not "
                + (dynamic_state_hint(extra[0]).strip() or "(a different table set?)"))
    return None


def _read_agreed(paths: list[str]) -> list[Any]:
    """Each file of ``paths`` (collective: any rank's problem is raised on every rank)."""
    out, problem = [], None
    try:
        out = [_read(path) for path in paths]
    except CheckpointError as exc:
        problem = str(exc)
    agree(problem)
    return out


def read_meta(ckpt: str) -> dict[str, Any]:
    """``meta.pt`` of a checkpoint folder (collective)."""
    return _read_agreed([os.path.join(ckpt, "meta.pt")])[0]


def load_sharded(ckpt: str, sharded_state: dict[str, Any], allow_unused: bool = False) -> None:
    """Fills ``sharded_state`` in place from the DCP files, resharding onto this world, after
    checking its keys and global shapes against the checkpoint's (collective); with
    ``allow_unused`` the checkpoint may hold keys the state does not ask for."""
    # against the keys of all ranks: one rank's are a part (see model_keys)
    problem = check_sharded_keys(ckpt, model_keys(sharded_state), allow_unused)
    agree(problem, name_rank=False)
    try:
        dcp.load(sharded_state, checkpoint_id=ckpt)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's is a BaseException
        problem = f"cannot load the tables of {ckpt}: {describe_os_error(exc)}"
    agree(problem)


def read_dense(ckpt: str, tp_ranks: list[int]) -> list[dict[str, Any]]:
    """The ``dense_tp<r>.pt`` of every TP rank in ``tp_ranks`` (collective)."""
    return _read_agreed([os.path.join(ckpt, f"dense_tp{r}.pt") for r in tp_ranks])


def load_checkpoint(path: str, sharded_state: dict[str, Any], place: RankPlace) -> CheckpointState:
    """Loads the tables in place into ``sharded_state`` and reads this rank's other files.

    All ranks call it. The files are checked against the manifest first; the returned
    ``rng`` is None when this rank did not exist in the saved run (different world size).
    """
    ckpt = resolve_checkpoint_dir(path)
    verify(ckpt)
    meta = read_meta(ckpt)
    problem = None
    if meta.get("tp_size", 1) != place.tp_size:
        problem = (
            f"{ckpt} was saved with tensor_model_parallel_size={meta.get('tp_size')} but this run "
            f"uses {place.tp_size}; resume with the same TP size"
        )
    agree(problem, name_rank=False)
    load_sharded(ckpt, sharded_state)
    paths = [os.path.join(ckpt, f"dense_tp{place.tp_rank}.pt")]
    if place.rank < int(meta.get("world_size", 1)):  # a rank the saved run had: its file
        paths.append(os.path.join(ckpt, f"rng_rank{place.rank}.pt"))
    dense, *rng = _read_agreed(paths)
    return CheckpointState(sharded_state, dense, meta, rng[0] if rng else None)
