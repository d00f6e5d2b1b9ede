"""File names and format version of a preprocessed dataset folder (shared by writer and reader),
its metadata reader, and the names of its memory-mapped layout (written by
:mod:`hstu.data.store` on first load)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hstu.data.errors import DataError

FORMAT_VERSION = 1
SEQUENCES_FILE = "sequences.parquet"
ITEM_MAP_FILE = "item_map.parquet"
METADATA_FILE = "metadata.json"

MAPPED_VERSION = 1
"""Version of the mapped layout: part of its key, so a new layout never reads an old folder."""
MAPPED_PREFIX = ".mapped-"
"""The mapped layout of a dataset folder is ``<dataset>/.mapped-<key>/`` (a sibling
``.mapped-<key>.lock`` serialises its writing), or ``<cache>/<name>.mapped-<key>/`` where the
dataset folder is not writable."""
MAPPED_MANIFEST = "manifest.json"
CACHE_ENV = "HSTU_DATA_CACHE"
"""Environment variable: the cache folder for the mapped layouts of read-only dataset folders
(default ``~/.cache/hstu``)."""


def read_metadata(path: Path, how: str | None = None) -> dict[str, Any]:
    """metadata.json of the dataset folder ``path``, its format version checked. ``how``: the
    preprocessor's arguments that would write it (the missing folder's line)."""
    meta_path = path / METADATA_FILE
    if not meta_path.exists():
        how = how or f"--dataset {path.name} --out {path.parent}"
        raise DataError(
            str(meta_path),
            f"no preprocessed dataset here; run: python -m hstu.data.preprocess {how}"
        )
    try:
        metadata = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise DataError(str(meta_path), f"unreadable metadata ({exc})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DataError(
            str(meta_path),
            f"format version {metadata.get('format_version')} != {FORMAT_VERSION}; "
            "rerun the preprocessor with --force",
        )
    return metadata
