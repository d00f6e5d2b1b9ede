"""Versioned serving roots: publish a new artifact while readers keep serving (docs/serving.md
"Serving the latest model").

A versioned root holds complete artifacts (today's format, :mod:`hstu.serving.artifact`) and
a pointer to the one to serve::

    <root>/v<step>/      one complete artifact per published step
    <root>/LATEST        one line: the name of the version to serve ("v120")
    <root>/.publish.lock held (flock) by the one process publishing into the root
    <root>/.staging-*    a version being written (never read; removed by the next publish)
    <root>/.trash-*      a version being removed (never read; removed by the next publish)
    <root>/WITHDRAWN     the versions rolled back (one name a line): never served again

Rolling back (:func:`rollback`, ``python -m hstu.serving.versions rollback <root>``): the
version served is withdrawn and ``LATEST`` names the newest older version that is not, in
one ``os.replace`` (readers see the old pointer or the new one).

Writing (:func:`publish`: staged, checked, fsynced, renamed, then ``LATEST`` replaced, so a
crash leaves ``LATEST`` naming the previous complete version), reading (:func:`open_latest`:
the pointer read once, a shared ``flock`` held on that version) and pruning (never the
version ``LATEST`` names, never one a reader holds): docs/serving.md, "Serving the latest
model".

Nothing here imports torch, torchrec, megatron or gin (the reading side runs in a serving
process with torch alone).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

POINTER = "LATEST"
WITHDRAWN = "WITHDRAWN"
PUBLISH_LOCK = ".publish.lock"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
MANIFEST = "manifest.json"  # the artifact's (hstu.serving.artifact.MANIFEST; no import cycle)
_VERSION = re.compile(r"^v(\d+)$")
EXIT_BAD_INPUT = 2
EXIT_DAMAGED = 3
_REPAIR = "publish again or write the name of a complete version into it"


class VersionError(Exception):
    """A versioned root that cannot be read or published into (printed as one line).
    ``code``: the exit code, 2 for a wrong path or request, 3 for a damaged root."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def version_name(step: int) -> str:
    return f"v{int(step)}"


def step_of(name: str) -> int | None:
    """``v<step>`` -> step; None for any other name."""
    m = _VERSION.match(name)
    return int(m.group(1)) if m else None


def list_versions(root: str | Path) -> list[tuple[int, str]]:
    """(step, name) of every version folder under ``root``, oldest first (staging and trash
    folders are not versions)."""
    out = []
    for entry in os.scandir(root):
        step = step_of(entry.name)
        if step is not None and entry.is_dir(follow_symlinks=False):
            out.append((step, entry.name))
    return sorted(out)


def read_pointer(root: str | Path) -> str | None:
    """The version ``LATEST`` names, or None where nothing is published yet. A pointer that
    does not hold a version name -> VersionError (exit 3)."""
    path = Path(root) / POINTER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    name = text.strip()
    if step_of(name) is None:
        raise VersionError(
            f"{path}: holds {text[:40]!r}, not a version name (v<step>); {_REPAIR}", EXIT_DAMAGED
        )
    return name


def withdrawn(root: str | Path) -> set[str]:
    """The versions rolled back (:func:`rollback`): never served again, not even when their
    step is published again."""
    try:
        text = (Path(root) / WITHDRAWN).read_text()
    except FileNotFoundError:
        return set()
    return {line.strip() for line in text.splitlines() if step_of(line.strip()) is not None}


def current_version(root: str | Path) -> str | None:
    """The version a reader of ``root`` gets now (cheap: one small file; for a server that
    polls for a new model and reloads when this changes)."""
    return read_pointer(root)


def is_versioned_root(path: str | Path) -> bool:
    """Whether ``path`` is a versioned root (a pointer, a publish lock or a version folder)
    rather than a plain artifact folder."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST).is_file():
        return False
    if (path / POINTER).is_file() or (path / PUBLISH_LOCK).is_file():
        return True
    return bool(list_versions(path))


# ----------------------------------------------------------------------------- reading


class Lease:
    """A shared lock on one version folder: while held, :func:`prune` does not remove it."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops its flock
            self.fd = None

    def __del__(self) -> None:
        self.release()


def _same_folder(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the folder ``fd`` was opened on (not removed, not replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def open_latest(root: str | Path, attempts: int = 200) -> tuple[Path, Lease]:
    """(the folder of the version ``LATEST`` names, a lease on it). A version removed between
    reading the pointer and locking it (a prune) sends the reader back to the pointer."""
    root = Path(root)
    name = None
    for _ in range(attempts):
        name = read_pointer(root)
        if name is None:
            raise VersionError(
                f"{root}: a versioned serving root with no complete version yet (no {POINTER}); "
                "publish one with python -m hstu.export --versioned"
            )
        path = root / name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            time.sleep(0.005)
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a pruner removes this very folder
        if _same_folder(fd, path):
            return path, Lease(fd)
        os.close(fd)
    raise VersionError(
        f"{root / POINTER}: names {name}, which is not there (removed by hand?); {_REPAIR}",
        EXIT_DAMAGED,
    )


# ----------------------------------------------------------------------------- writing


@contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    """One publisher per root (an exclusive flock on ``.publish.lock``)."""
    fd = os.open(root / PUBLISH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VersionError(f"{root}: another process is publishing into this root "
                           f"({PUBLISH_LOCK} is locked); one publisher per root") from None
    try:
        yield
    finally:
        os.close(fd)


def _remove_leftovers(root: Path) -> None:
    """Staging and trash folders a killed publisher left (no other publisher runs: we hold
    the publish lock; readers never open them)."""
    for entry in os.scandir(root):
        if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _check_complete(folder: Path) -> None:
    """The staged artifact's files against its manifest (present, sizes; the writer took the
    CRC32s from the files themselves), everything fsynced."""
    from hstu.training.checkpoint import _fsync_file, check_files, fsync_dir

    if not (folder / MANIFEST).is_file():
        raise VersionError(
            f"{folder}: the writer left no {MANIFEST}; nothing published", EXIT_DAMAGED
        )
    problem = check_files(str(folder), checksums=False)
    if problem is not None:
        raise VersionError(f"{problem}; nothing published", EXIT_DAMAGED)
    for entry in os.scandir(folder):
        _fsync_file(entry.path)
    fsync_dir(str(folder))


def prune(root: str | Path, keep: int, log: Callable[[str], Any] = print) -> list[str]:
    """Removes versions beyond the newest ``keep`` (by step), never the one ``LATEST``
    names, and skips one a reader holds (tried again at the next publish). Returns the names
    removed."""
    from hstu.training.checkpoint import fsync_dir

    root = Path(root)
    pointed = read_pointer(root)
    versions = list_versions(root)
    spared = {name for _, name in versions[-keep:]} | {pointed}
    removed, busy = [], []
    for _, name in versions:
        if name in spared:
            continue
        path = root / name
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy.append(name)
                continue
            trash = root / f"{TRASH_PREFIX}{name}-{os.getpid()}"
            os.rename(path, trash)  # gone for readers at once; a waiting reader sees it moved
            shutil.rmtree(trash)
            removed.append(name)
        finally:
            os.close(fd)
    if removed or busy:
        fsync_dir(str(root))
    if busy:
        log(
            f"[export] kept {', '.join(busy)} beyond keep={keep}: a reader holds it (removed at "
            "a later publish)"
        )
    return removed


def publish(root: str | Path, write: Callable[[Path], Any], step: int | None = None, keep: int = 3,
            log: Callable[[str], Any] = print) -> Path:
    """Publishes one version into the versioned ``root`` and returns its folder.

    ``write(staging)`` writes a complete artifact into ``staging`` (a new hidden folder under
    ``root``; :func:`hstu.export.export` does). ``step``: the version's step (default: the
    staged manifest's ``checkpoint.step``); given, a step that cannot be published is refused
    before anything is written. Rules: a step newer than every published one becomes
    ``v<step>`` and ``LATEST`` names it; a step already published is kept as it is (a
    resumed run that reaches a published step again, with the same weights) and ``LATEST``
    moves to it only if it is the newest; a step older than the one served and not
    published is refused (VersionError). Then :func:`prune` to ``keep``."""
    from hstu.training.checkpoint import fsync_dir, write_text_atomic

    if keep < 1:
        raise VersionError(f"keep={keep}: keep at least 1 version (the one served)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST).is_file():
        raise VersionError(f"{root}: a plain artifact folder, not a versioned root; publish into "
                           "another folder (or remove this one)")
    with _publish_lock(root):
        _remove_leftovers(root)
        if step is not None:
            _refuse_older(root, int(step))
        staging = root / f"{STAGING_PREFIX}{os.getpid()}-{time.time_ns()}"
        try:
            write(staging)
            _check_complete(staging)
            if step is None:
                step = json.loads((staging / MANIFEST).read_text())["checkpoint"]["step"]
            step = int(step)
            final = root / version_name(step)
            if final.exists():
                log(f"[export] {final.name} is already published in {root}: kept as it is "
                    "(a resumed run reaching a published step again)")
            else:
                _refuse_older(root, step)
                os.rename(staging, final)
                fsync_dir(str(root))
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        pointed = read_pointer(root)
        if final.name in withdrawn(root):
            log(f"[export] {final.name} was rolled back ({WITHDRAWN}): kept unserved; "
                f"{pointed} stays served")
        elif pointed is None or step_of(pointed) < step:
            write_text_atomic(str(root / POINTER), final.name + "\n")
            log(f"[export] published {final.name} in {root} ({POINTER} -> {final.name})")
        removed = prune(root, keep, log)
        if removed:
            log(f"[export] removed {', '.join(removed)} (keep={keep})")
    return final


def rollback(root: str | Path, log: Callable[[str], Any] = print) -> str:
    """Withdraws the version ``LATEST`` names and points ``LATEST`` at the newest older complete
    version not withdrawn; returns its name. The pointer is replaced in one ``os.replace``: a
    reader gets the old version or the new one, and one that holds the withdrawn version keeps
    it until it closes it. The withdrawn version stays on disk (pruned as any unserved one) and
    is never served again. Raises VersionError (one line) where there is nothing to go back to."""
    from hstu.training.checkpoint import write_text_atomic

    root = Path(root)
    if not is_versioned_root(root):
        raise VersionError(f"{root}: not a versioned serving root (no {POINTER}, no v<step> "
                           "folders)")
    with _publish_lock(root):
        pointed = read_pointer(root)
        if pointed is None:
            raise VersionError(
                f"{root}: nothing is served yet (no {POINTER}); nothing to roll back"
            )
        gone = withdrawn(root)
        older = [name for step, name in list_versions(root)
                 if step < step_of(pointed) and name not in gone
                 and (root / name / MANIFEST).is_file()]
        if not older:
            raise VersionError(f"{root}: {pointed} is served and no older complete version is "
                               "left to roll back to")
        target = older[-1]
        # first the withdrawal (a kill before the pointer switch leaves the pointer as it was:
        # rolling back again goes on from there), then the pointer
        write_text_atomic(str(root / WITHDRAWN),
                          "".join(f"{n}\n" for n in sorted(gone | {pointed}, key=step_of)))
        write_text_atomic(str(root / POINTER), target + "\n")
    log(f"[versions] rolled back {root}: {POINTER} -> {target} ({pointed} withdrawn)")
    return target


def _refuse_older(root: Path, step: int) -> None:
    pointed = read_pointer(root)
    if pointed is None or (root / version_name(step)).exists():
        return
    if step_of(pointed) > step:
        raise VersionError(f"{root}: step {step} is older than the version served ({pointed}) "
                           "and was never published; publish a newer step (or into another folder)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hstu.serving.versions",
        description="A versioned serving root: show its versions, or roll back to the previous "
                    "one (docs/serving.md, 'Serving the latest model')")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the versions, the one served, the withdrawn ones").add_argument(
        "root")
    sub.add_parser("rollback", help="serve the previous version (the current one is "
                                    "withdrawn)").add_argument("root")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "rollback":
            rollback(ns.root)
            return 0
        if not is_versioned_root(ns.root):
            raise VersionError(f"{ns.root}: not a versioned serving root")
        pointed, gone = read_pointer(ns.root), withdrawn(ns.root)
        for _, name in list_versions(ns.root):
            flags = [f for f, on in (("served", name == pointed), ("withdrawn", name in gone))
                     if on]
            print(name + (f"  ({', '.join(flags)})" if flags else ""))
        return 0
    except VersionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


__all__ = [
    "POINTER",
    "WITHDRAWN",
    "Lease",
    "VersionError",
    "current_version",
    "is_versioned_root",
    "list_versions",
    "open_latest",
    "prune",
    "publish",
    "read_pointer",
    "rollback",
    "step_of",
    "version_name",
    "withdrawn",
]


if __name__ == "__main__":
    sys.exit(main())
