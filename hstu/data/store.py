"""A preprocessed dataset held in memory as flat arrays (read back from the preprocessor's output)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hstu.data.errors import DataError
from hstu.data.layout import FORMAT_VERSION, METADATA_FILE, SEQUENCES_FILE


@dataclass
class SequenceStore:
    """All users' sequences, concatenated. Legend: U users, N interactions, X contextual features.

    offsets int64 [U+1] (user u owns rows offsets[u]:offsets[u+1]); items, timestamps int64 [N];
    actions int64 [N] or None; contextual: name -> int64 [U].
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    actions: np.ndarray | None
    contextual: dict[str, np.ndarray]
    metadata: dict[str, Any]

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def load(cls, path: str | Path) -> SequenceStore:
        path = Path(path)
        meta_path = path / METADATA_FILE
        if not meta_path.exists():
            name = path.name
            raise DataError(
                str(meta_path),
                f"no preprocessed dataset here; run: python -m hstu.data.preprocess --dataset {name} --out {path.parent}",
            )
        try:
            metadata = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise DataError(str(meta_path), f"unreadable metadata ({exc})") from None
        if metadata.get("format_version") != FORMAT_VERSION:
            raise DataError(
                str(meta_path),
                f"format version {metadata.get('format_version')} != {FORMAT_VERSION}; rerun the preprocessor with --force",
            )
        try:
            table = pq.read_table(path / SEQUENCES_FILE)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DataError(str(path / SEQUENCES_FILE), f"unreadable ({exc})") from None

        def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
            col = table.column(name).combine_chunks()
            offs = col.offsets.to_numpy().astype(np.int64)
            return offs - offs[0], col.flatten().to_numpy().astype(np.int64)

        offsets, items = flat("item_ids")
        _, timestamps = flat("timestamps")
        actions = flat("actions")[1] if "actions" in table.column_names else None
        contextual = {
            name: table.column(name).to_numpy().astype(np.int64)
            for name in metadata["contextual_feature_names"]
        }
        _check_timestamps(path / SEQUENCES_FILE, offsets, timestamps)
        return cls(offsets, items, timestamps, actions, contextual, metadata)


def _check_timestamps(path: Path, offsets: np.ndarray, timestamps: np.ndarray) -> None:
    """Refuses negative timestamps and sequences that go back in time (counted)."""
    negative = int((timestamps < 0).sum())
    steps = np.diff(timestamps)
    back = np.zeros(len(steps) + 1, dtype=bool)
    back[1:] = steps < 0
    back[offsets[:-1]] = False  # the first interaction of a user has no predecessor
    users = np.unique(np.searchsorted(offsets, np.flatnonzero(back), side="right") - 1)
    if negative or len(users):
        raise DataError(
            str(path),
            f"{negative} negative timestamps, {len(users)} users whose timestamps go back in time"
            + (f" (first: user row {int(users[0])})" if len(users) else "")
            + "; sequences must be sorted by time: rerun python -m hstu.data.preprocess --force",
            field="timestamps",
        )


__all__ = ["SequenceStore"]
