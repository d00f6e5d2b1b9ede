"""Raw sources: an official archive (zip / tar[.gz]), an unpacked folder, or a download.

A :class:`RawSource` finds files by their base name wherever they sit inside the archive
or folder (``ml-1m/ratings.dat`` and ``ratings.dat`` both match ``ratings.dat``), reads
them as bytes, and turns every archive problem into a one-line :class:`DataError`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from hstu.data.errors import DataError
from hstu.registry import DATASETS

_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError)


def download(name: str, dest_dir: str | Path) -> Path:
    """Downloads the official archive of `name` (hstu.registry.DATASETS; machines without
    internet cannot reach it: pass --raw) into dest_dir (atomically); returns its path.

    An archive already present is reused. Raises DataError when the network is unreachable.
    """
    url = DATASETS[name].url
    dest_dir = Path(dest_dir)
    dest = dest_dir / url.rsplit("/", 1)[1]
    if dest.exists():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(
            url, f"download failed ({exc}); fetch it by hand and pass --raw PATH"
        ) from None
    return dest


class RawSource:
    """Read-only view of an archive or a folder of raw files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(str(self.path), "no such file or folder")
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            if self.path.is_dir():
                self._members = sorted(
                    str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()
                )
            elif zipfile.is_zipfile(self.path) or self.path.suffix == ".zip":
                self._zip = zipfile.ZipFile(self.path)
                self._members = sorted(i.filename for i in self._zip.infolist() if not i.is_dir())
            elif self._looks_like_tar():
                self._tar = tarfile.open(self.path)  # noqa: SIM115 - held open until close()
                self._members = sorted(m.name for m in self._tar.getmembers() if m.isfile())
            else:
                # A single raw file given directly (e.g. ratings.csv).
                self._members = [self.path.name]
        except _ARCHIVE_ERRORS as exc:
            raise DataError(
                str(self.path), f"truncated or corrupt archive ({type(exc).__name__}: {exc})"
            ) from None

    def _looks_like_tar(self) -> bool:
        name = self.path.name.lower()
        if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            return True
        try:
            return tarfile.is_tarfile(self.path)
        except _ARCHIVE_ERRORS:
            return False

    @property
    def members(self) -> list[str]:
        return list(self._members)

    def find(self, pattern: str) -> list[str]:
        """Members whose base name matches the glob `pattern`, in name order (skips macOS junk)."""
        return [
            m
            for m in self._members
            if fnmatch.fnmatch(os.path.basename(m), pattern)
            and "__MACOSX" not in m
            and not os.path.basename(m).startswith("._")
        ]

    def require(self, pattern: str) -> list[str]:
        """Like find, but at least one match must exist."""
        found = self.find(pattern)
        if not found:
            raise DataError(
                str(self.path), f"missing file {pattern} (not found in the {self.kind})"
            )
        return found

    def require_one(self, pattern: str) -> str:
        found = self.require(pattern)
        if len(found) > 1:
            raise DataError(str(self.path), f"several files match {pattern}: {', '.join(found)}")
        return found[0]

    @property
    def kind(self) -> str:
        return "zip archive" if self._zip else "tar archive" if self._tar else "folder"

    def display(self, member: str) -> str:
        """Name used in error messages: archive:member or the file's path."""
        if self._zip is not None or self._tar is not None:
            return f"{self.path.name}:{member}"
        return str(self.path / member) if self.path.is_dir() else str(self.path)

    def read_bytes(self, member: str) -> bytes:
        with self.open_binary(member) as fh:
            return fh.read()

    def open_binary(self, member: str) -> BinaryIO:
        """The member as a binary stream from its start (archives decompress as it is read)."""
        try:
            if self._zip is not None:
                return _Guarded(self._zip.open(member), self.display(member))
            if self._tar is not None:
                handle = self._tar.extractfile(member)
                assert handle is not None
                return _Guarded(handle, self.display(member))
            path = self.path / member if self.path.is_dir() else self.path
            return _Guarded(open(path, "rb"), self.display(member))
        except _ARCHIVE_ERRORS as exc:
            raise _member_error(self.display(member), exc) from None

    def checksum(self, members: list[str]) -> str:
        """sha256 over the archive file, or over the named members of a folder."""
        digest = hashlib.sha256()
        if self._zip is not None or self._tar is not None or not self.path.is_dir():
            paths = [self.path]
        else:
            paths = [self.path / m for m in sorted(members)]
        for p in paths:
            digest.update(p.name.encode() + b"\0")
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        return digest.hexdigest()

    def __enter__(self) -> RawSource:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()


def _member_error(where: str, exc: BaseException) -> DataError:
    return DataError(where, f"truncated or corrupt archive member ({type(exc).__name__}: {exc})")


class _Guarded(io.RawIOBase):
    """A member's stream whose archive errors (truncated or corrupt data met while reading)
    become the one-line DataError naming the member."""

    def __init__(self, handle: BinaryIO, where: str) -> None:
        self._handle = handle
        self._where = where

    def readable(self) -> bool:
        return True

    def _guard(self, call, *args):
        try:
            return call(*args)
        except _ARCHIVE_ERRORS as exc:
            raise _member_error(self._where, exc) from None

    def readinto(self, buffer) -> int:
        return self._guard(self._handle.readinto, buffer)

    def read(self, size: int = -1) -> bytes:
        return self._guard(self._handle.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._guard(self._handle.readline, size)

    def close(self) -> None:
        self._handle.close()
        super().close()


__all__ = ["RawSource", "download"]
