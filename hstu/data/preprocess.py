"""Raw interaction logs -> ``<out>/<name>/`` (one row per user, chronological, typed).

    python -m hstu.data.preprocess --dataset ml-1m --raw ~/Downloads/ml-1m.zip
    python -m hstu.data.preprocess --dataset synthetic
    python -m hstu.data.preprocess --dataset custom --gin-param 'CustomDataArgs.path="log.csv"'

Output folder (written to a temporary folder, then renamed into place):
- ``sequences.parquet``: one row per user (legend U users, L[u] interactions of user u):
  ``user_id`` int64 (1..U), ``raw_user_id``, ``item_ids`` list<int64>[L[u]],
  ``timestamps`` list<int64>[L[u]] (unix seconds), ``actions`` list<int64>[L[u]] (when
  the dataset has an action), one int64 column per contextual feature.
- ``item_map.parquet``: ``item_id`` -> ``raw_item_id``.
- ``metadata.json``: counts, vocabulary sizes, sequence length statistics, source checksum.

Sequences are sorted stably by time: interactions with the same timestamp keep their order
in the raw file (docs/data.md "Preprocessing"). Re-running on the same input is a no-op unless
``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hstu.args import ConfigError
from hstu.data.errors import DataError
from hstu.data.layout import FORMAT_VERSION, ITEM_MAP_FILE, METADATA_FILE, SEQUENCES_FILE
from hstu.data.parsing import Columns, encode_dense, lookup
from hstu.data.raw import RawSource, download
from hstu.data.sources import (
    ACTION_FEATURE,
    ITEM_FEATURE,
    USER_FEATURE,
    Parsed,
    _check_bound,
)
from hstu.registry import DATASETS, load


def check_known_dataset(name: str) -> None:
    """--dataset: a name in hstu.registry.DATASETS (one line with the closest name)."""
    if name not in DATASETS:
        raise DataError("--dataset", DATASETS.unknown(name))


def check_output_name(dataset: str, name: str) -> None:
    """--name: a folder name under --out, never another built-in dataset's."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise DataError("--name", f"{name!r} is not a folder name (letters, digits, - and _)")
    if name != dataset and name in DATASETS:
        raise DataError(
            "--name", f"{name!r} is a built-in dataset; name your {dataset} data differently"
        )


def _stable_user_time_order(users: np.ndarray, time_key: np.ndarray, num_users: int) -> np.ndarray:
    """Permutation sorting by (user, time), stable: file order is kept within equal times."""
    if len(time_key) == 0:
        return np.zeros(0, dtype=np.int64)
    t_min = int(time_key.min())
    span = int(time_key.max()) - t_min + 1
    if (num_users + 1) * span < (1 << 62):
        key = users * span + (time_key - t_min)
        return np.argsort(key, kind="stable")
    return np.lexsort((time_key, users))


BYTES_PER_ROW = 160
"""Working set of one interaction while its partition is sorted and written: the columns
(user, item, time, action: 32 bytes), sort key and permutation (16), the sorted copies (24),
item codes (8), the Arrow arrays and the compressed row group (~30), numpy temporaries."""
DEFAULT_MEMORY_GB = 4.0
SPILL_DIR = ".spill"


def group(parsed: Parsed) -> Grouping:
    """The grouping of `parsed` in memory, its partitions run through (metadata only: what
    build_metadata reads; preprocess() writes the partitions instead)."""
    grouping = Grouping(parsed, DEFAULT_MEMORY_GB * 2**30, None)
    for _ in grouping.tables():
        pass
    return grouping


class _Spill:
    """Columns appended block by block, read back in the same order: in memory (folder None)
    or one raw binary file per column under `folder` (numeric columns only)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.num_rows = 0
        self._memory: list[dict[str, np.ndarray]] = []
        self._dtypes: dict[str, np.dtype] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def append(self, cols: dict[str, np.ndarray]) -> None:
        n = len(next(iter(cols.values())))
        if n == 0:
            return
        if self.folder is None:
            self._memory.append(cols)
        else:
            for name, values in cols.items():
                assert values.dtype.kind in "iuf", f"spill column {name} is not numeric"
                self._dtypes.setdefault(name, values.dtype)
                with open(self.folder / f"{name}.bin", "ab") as fh:
                    values.astype(self._dtypes[name], copy=False).tofile(fh)
        self.num_rows += n

    def blocks(self, rows: int) -> Iterator[dict[str, np.ndarray]]:
        """The rows in append order, at most `rows` at a time (in memory: as appended)."""
        if self.folder is None:
            yield from self._memory
            return
        for start in range(0, self.num_rows, rows):
            count = min(rows, self.num_rows - start)
            yield {
                name: np.fromfile(
                    self.folder / f"{name}.bin", dtype, count, offset=start * dtype.itemsize
                )
                for name, dtype in self._dtypes.items()
            }

    def load(self) -> dict[str, np.ndarray]:
        parts = list(self.blocks(max(self.num_rows, 1)))
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def remove(self) -> None:
        self._memory = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _Distinct:
    """The sorted distinct values of a column seen block by block, with their counts.

    Small non-negative integers are counted in an array indexed by value (`dense_limit`
    values at most); other integers and strings are merged as sorted (value, count) arrays.
    Strings sort as encode_dense sorts them (by str), so codes are the same as it gives.
    """

    def __init__(self, dense_limit: int, count: bool) -> None:
        self._limit = dense_limit
        self._count = count
        self._dense_dtype = np.int64 if count else np.bool_
        self._dense: np.ndarray | None = None
        self._values: np.ndarray | None = None
        self._counts: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        if values.dtype.kind in "iu":
            values = values.astype(np.int64, copy=False)
            lo, hi = int(values.min()), int(values.max())
            if self._values is None and lo >= 0 and hi < self._limit:
                if self._dense is None or len(self._dense) <= hi:
                    size = hi + 1 if self._dense is None else max(hi + 1, 2 * len(self._dense))
                    grown = np.zeros(min(size, self._limit), self._dense_dtype)
                    if self._dense is not None:
                        grown[: len(self._dense)] = self._dense
                    self._dense = grown
                if self._count:
                    uniq, counts = np.unique(values, return_counts=True)
                    self._dense[uniq] += counts
                else:
                    self._dense[values] = True
                return
            uniq, counts = np.unique(values, return_counts=True)
        else:
            uniq, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
        self._merge(uniq, counts)

    def _merge(self, uniq: np.ndarray, counts: np.ndarray) -> None:
        if self._dense is not None:
            present = np.flatnonzero(self._dense)
            dense, self._dense = self._dense, None
            self._merge(present, dense[present])
        if self._values is None:
            self._values, self._counts = uniq, counts
            return
        assert self._counts is not None
        if (self._values.dtype.kind in "iu") != (uniq.dtype.kind in "iu"):
            raise DataError("input", "id types differ between blocks (integer vs text)")
        merged, inverse = np.unique(np.concatenate([self._values, uniq]), return_inverse=True)
        self._counts = np.bincount(
            inverse, weights=np.concatenate([self._counts, counts]), minlength=len(merged)
        ).astype(np.int64)
        self._values = merged

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct values [K] (int64, or object strings), counts int64 [K])."""
        if self._dense is not None:
            present = np.flatnonzero(self._dense)
            return present, self._dense[present].astype(np.int64)
        if self._values is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        assert self._counts is not None
        values = self._values if self._values.dtype.kind in "iu" else self._values.astype(object)
        return values, self._counts


def _code_table(uniques: np.ndarray, limit: int):
    """values -> 1-based position in sorted `uniques` (0 where absent), as a function."""
    if uniques.dtype.kind in "iu" and len(uniques) and uniques[0] >= 0 and uniques[-1] < limit:
        # table[-1] stays 0: -1 (clipped negatives) and values beyond the last are absent
        table = np.zeros(int(uniques[-1]) + 2, dtype=np.int64)
        table[uniques] = np.arange(1, len(uniques) + 1)
        return lambda values: table[np.clip(values.astype(np.int64), -1, len(table) - 1)]
    return lambda values: lookup(uniques, values)


def _check_block(block: Columns, parsed: Parsed) -> tuple[int, tuple | None]:
    """The checks of every interaction: ids and action values (raises at the first bad row);
    returns the number of negative timestamps and (file, line, value) of the first."""
    shown = parsed.column_names
    _check_bound(block, "user", parsed.max_user_id, "user", shown.get("user"))
    _check_bound(block, "item", parsed.max_item_id, "item", shown.get("item"))
    if "action" in block.data and parsed.num_action_values is not None:
        act = block.data["action"]
        bad = (act < 0) | (act >= parsed.num_action_values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise block.error(
                row,
                shown.get("action", "action"),
                f"action {act[row]} outside [0, {parsed.num_action_values})",
            )
    negative = block.data["time_key"] < 0
    if not negative.any():
        return 0, None
    row = int(np.flatnonzero(negative)[0])
    return int(negative.sum()), (*block.locate(row), block.data["time_key"][row])


class Grouping:
    """Groups a parsed log per user in partitions that fit a memory budget.

    1. scan: every block is checked, its users counted and (when streamed) spilled to disk
       in file order; users with too few interactions are dropped, the others coded 1..U in
       sorted raw-id order.
    2. route: users are cut into ranges of consecutive codes, each with about `rows` rows;
       every row goes to its range's spill in file order; the kept rows' distinct items give
       the item codes (sorted raw-id order).
    3. tables(): each range in turn is loaded, sorted stably by (user, time) (equal times keep
       their file order) and handed out; its users come out in code order.

    Every step is the same whether there is one partition or many, in memory or on disk; the
    output is the same for any budget. Legend: U users, N interactions.
    """

    def __init__(self, parsed: Parsed, memory_bytes: float, spill_dir: Path | None) -> None:
        self.parsed = parsed
        self.rows_per_part = max(1, int(memory_bytes // BYTES_PER_ROW))
        dense_limit = max(1 << 20, int(min(memory_bytes, 1 << 40) // 64))
        streamed = parsed.log is None
        source = _Spill(spill_dir / "log" if streamed and spill_dir is not None else None)
        users = _Distinct(dense_limit, count=True)
        first_name: str | None = None
        negatives, first_negative = 0, None
        for block in parsed.blocks():
            if first_name is None and block.segments:
                first_name = block.segments[0][0]
            count, where_negative = _check_block(block, parsed)
            if count and not negatives:
                first_negative = where_negative
            negatives += count
            if negatives:
                continue  # counted to the end, then refused
            users.add(block.data["user"])
            source.append(block.data)
        if negatives:
            assert first_negative is not None
            name, line, value = first_negative
            raise DataError(
                name,
                f"timestamp {value} is negative ({negatives} interactions have one); fix the "
                "source or drop those rows",
                line=line,
                field=parsed.column_names.get("time_key", "timestamp"),
            )
        where = first_name or "input"
        if source.num_rows == 0:
            raise DataError(where, "no interactions")
        all_users, counts = users.result()
        keep = counts >= parsed.min_user_interactions
        self.dropped_users = int((~keep).sum())
        if not keep.any():
            raise DataError(
                where, f"every user has fewer than {parsed.min_user_interactions} interactions"
            )
        self.raw_users = all_users[keep]
        self.num_users = len(self.raw_users)
        self.user_code = _code_table(self.raw_users, dense_limit)
        self.offsets = np.zeros(self.num_users + 1, dtype=np.int64)
        np.cumsum(counts[keep], out=self.offsets[1:])

        # partitions: user u goes to floor(offset of its first row / rows), so no user is
        # split and a partition holds at most rows + (its last user's length - 1) rows
        first_block = next(source.blocks(1))
        self.has_actions = "action" in first_block
        self.num_action_values = parsed.num_action_values if self.has_actions else None
        # in memory only: a text column (ids of custom data) or a per-user column of the log
        # (custom data's latest context, coded over all users at once)
        splittable = spill_dir is not None and not any(
            v.dtype.kind not in "iuf" or k.startswith("ctx:") for k, v in first_block.items()
        )
        del first_block
        part_of = (
            self.offsets[:-1] // self.rows_per_part
            if splittable
            else np.zeros(self.num_users, dtype=np.int64)
        )
        _, starts = np.unique(part_of, return_index=True)
        self.part_first = starts + 1  # first user code of each partition
        self.part_last = np.append(starts[1:], self.num_users)
        num_parts = len(starts)
        part_of_code = np.zeros(self.num_users + 1, dtype=np.int64)
        part_of_code[1:] = np.repeat(np.arange(num_parts), self.part_last - self.part_first + 1)

        items = _Distinct(dense_limit, count=False)
        block_rows = max(1, self.rows_per_part // 2)
        if num_parts == 1:
            self._parts = [source]
            for block in source.blocks(block_rows):
                items.add(block["item"][self.user_code(block["user"]) > 0])
        else:
            assert spill_dir is not None
            self._parts = [_Spill(spill_dir / f"part{k}") for k in range(num_parts)]
            for block in source.blocks(block_rows):
                code = self.user_code(block["user"])
                kept = code > 0
                if not kept.all():
                    block = {k: v[kept] for k, v in block.items()}
                    code = code[kept]
                items.add(block["item"])
                part = part_of_code[code]
                order = np.argsort(part, kind="stable")
                bounds = np.searchsorted(part[order], np.arange(num_parts + 1))
                for k in np.flatnonzero(np.diff(bounds)):
                    rows = order[bounds[k] : bounds[k + 1]]
                    self._parts[k].append({name: v[rows] for name, v in block.items()})
            source.remove()
        self.num_parts = num_parts
        self.item_ids, _ = items.result()
        self.raw_items = self.item_ids
        if parsed.keep_item_ids:
            self.num_items = int(parsed.max_item_id) + 1
            self.item_code = lambda values: values.astype(np.int64, copy=False)
        else:
            self.num_items = len(self.raw_items) + 1  # dense ids 1..N; 0 is never an item
            self.item_ids = np.arange(1, self.num_items)
            self.item_code = _code_table(self.raw_items, dense_limit)
        self.contextual: dict[str, np.ndarray] = {
            USER_FEATURE: np.arange(1, self.num_users + 1, dtype=np.int64)
        }
        self.contextual_vocab: dict[str, int] = {USER_FEATURE: self.num_users + 1}
        self.users_without_features = 0
        self._user_features()

    def _user_features(self) -> None:
        table = self.parsed.user_table
        if table is None:
            return
        _check_bound(table, "user", self.parsed.max_user_id, "user")
        tusers = table.data["user"]
        uniq_t, count_t = np.unique(tusers, return_counts=True)
        if (count_t > 1).any():
            dup = uniq_t[count_t > 1][0]
            rows = np.flatnonzero(tusers == dup)
            raise table.error(
                int(rows[1]),
                "user",
                f"user {dup} is listed twice (first at line {table.locate(int(rows[0]))[1]})",
            )
        codes = lookup(self.raw_users, tusers)  # 0 for users without interactions
        present = codes > 0
        self.users_without_features = self.num_users - int(present.sum())
        for name in self.parsed.user_feature_names:
            fcodes, funiq = encode_dense(table.data[name])
            column = np.zeros(self.num_users + 1, dtype=np.int64)
            column[codes[present]] = fcodes[present]
            self.contextual[name] = column[1:]
            self.contextual_vocab[name] = len(funiq) + 1

    def tables(self) -> Iterator[pa.Table]:
        """Each partition's rows of sequences.parquet (users first..last in code order), its
        spill removed once handed out."""
        for k, spill in enumerate(self._parts):
            first, last = int(self.part_first[k]), int(self.part_last[k])
            data = spill.load()
            users = self.user_code(data["user"])
            kept = users > 0
            if not kept.all():
                data = {name: v[kept] for name, v in data.items()}
                users = users[kept]
            users -= first
            time_key = data["time_key"].astype(np.int64, copy=False)
            order = _stable_user_time_order(users, time_key, last - first + 1)
            del users
            offsets = self.offsets[first - 1 : last + 1] - self.offsets[first - 1]
            items = self.item_code(data["item"][order])
            timestamps = time_key[order]
            if self.parsed.time_key_per_second != 1:
                timestamps //= self.parsed.time_key_per_second
            actions = data["action"][order] if "action" in data else None
            for name, values in data.items():
                if name.startswith("ctx:"):  # only in one partition (see __init__)
                    last_rows = order[offsets[1:] - 1]
                    fcodes, funiq = encode_dense(values[last_rows])
                    self.contextual[name[4:]] = fcodes
                    self.contextual_vocab[name[4:]] = len(funiq) + 1
            del data, order
            spill.remove()
            users = slice(first - 1, last)
            raw_users = self.raw_users[users]
            cols: dict[str, pa.Array] = {
                USER_FEATURE: pa.array(self.contextual[USER_FEATURE][users]),
                "raw_user_id": pa.array(
                    raw_users.tolist() if raw_users.dtype == object else raw_users
                ),
                "item_ids": _list_column(offsets, items),
                "timestamps": _list_column(offsets, timestamps),
            }
            if actions is not None:
                cols["actions"] = _list_column(offsets, actions)
            for name, values in self.contextual.items():
                if name != USER_FEATURE:
                    cols[name] = pa.array(values[users])
            del items, timestamps, actions
            yield pa.table(cols)


def _list_column(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.LargeListArray.from_arrays(
        pa.array(offsets, pa.int64()), pa.array(values, pa.int64())
    )


def seqlen_stats(offsets: np.ndarray) -> dict[str, float]:
    lengths = np.diff(offsets)
    return {
        "max": int(lengths.max()),
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 2),
        "median": float(np.median(lengths)),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(out_dir: Path) -> list[str]:
    """Removes ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders of preprocess runs that were
    killed (their PID is gone); returns their names."""
    removed = []
    for kind in ("tmp", "old"):
        for path in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            if kind == "old" and not out_dir.exists():
                os.rename(path, out_dir)  # killed between its two renames: put it back
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def write(
    grouping: Grouping, tmp: Path, out_dir: Path, name: str, source: dict, options: dict
) -> dict[str, Any]:
    """Writes the three files into the temporary sibling folder ``tmp`` (sequences.parquet one
    partition at a time, a row group or more each), then renames it to ``out_dir``; returns
    the metadata written."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    writer = None
    try:
        for table in grouping.tables():
            if writer is None:
                writer = pq.ParquetWriter(
                    tmp / SEQUENCES_FILE, table.schema, compression="lz4", use_dictionary=False
                )
            writer.write_table(table)
            del table
    finally:
        if writer is not None:
            writer.close()
    meta = build_metadata(name, grouping, source, options)
    raw_items = grouping.raw_items
    pq.write_table(
        pa.table({
            "item_id": pa.array(grouping.item_ids),
            "raw_item_id": pa.array(raw_items.tolist() if raw_items.dtype == object else raw_items),
        }),
        tmp / ITEM_MAP_FILE,
    )
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(tmp / SPILL_DIR, ignore_errors=True)
    try:
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        if old.exists() and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return meta


def build_metadata(
    name: str, grouping: Grouping, source: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """metadata.json of a grouping whose partitions were all handed out."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "num_users": int(len(grouping.offsets) - 1),
        "num_items": int(grouping.num_items),
        "num_distinct_items": len(grouping.item_ids),
        "num_interactions": int(grouping.offsets[-1]),
        "item_feature_name": ITEM_FEATURE,
        "item_ids": "kept as declared, in [0, num_items)"
        if options.get("keep_item_ids")
        else "dense 1..num_items-1 in sorted raw-id order; 0 is never an item",
        "action_feature_name": ACTION_FEATURE if grouping.has_actions else None,
        "num_action_values": grouping.num_action_values,
        "action_kind": grouping.parsed.action_kind if grouping.has_actions else None,
        "action_values": grouping.parsed.action_values,
        "contextual_feature_names": list(grouping.contextual),
        "contextual_vocab_sizes": {k: int(v) for k, v in grouping.contextual_vocab.items()},
        "seqlen": seqlen_stats(grouping.offsets),
        "dropped_users": grouping.dropped_users,
        "users_without_features": grouping.users_without_features,
        "timestamp_unit": "s",
        "source": source,
        "options": options,
    }


def format_stats(meta: dict[str, Any]) -> str:
    s = meta["seqlen"]
    head = (
        f"{'dataset':<14}{'#users':>9}{'seqlen max':>12}{'min':>6}{'mean':>9}"
        f"{'median':>8}{'#items':>10}{'#interactions':>15}"
    )
    row = (
        f"{meta['dataset']:<14}{meta['num_users']:>9}{s['max']:>12}{s['min']:>6}{s['mean']:>9.2f}"
        f"{s['median']:>8.0f}{meta['num_distinct_items']:>10}{meta['num_interactions']:>15}"
    )
    return head + "\n" + row


def preprocess(
    name: str,
    raw: str | Path | None = None,
    out: str | Path = "tmp_data",
    force: bool = False,
    custom: Any = None,
    synthetic: Any = None,
    verbose: bool = True,
    output_name: str | None = None,
    memory_gb: float = DEFAULT_MEMORY_GB,
) -> dict[str, Any]:
    """Preprocesses dataset `name` into ``<out>/<output_name or name>`` and returns its metadata.

    Args:
        name: a dataset of hstu.registry.DATASETS.
        raw: archive, folder or file of the raw data; None downloads the official archive
            (custom: the file or folder, else CustomDataArgs.path; synthetic needs nothing).
        out: parent folder of the output.
        force: rebuild even when the output is up to date.
        custom / synthetic: CustomDataArgs / SyntheticDataArgs (default: gin-bound ones).
        output_name: folder and dataset name of the output (``--name``); train on it with
            ``DatasetArgs.dataset_name = "<output_name>"``.
        memory_gb: the budget of the grouping (``--memory-gb``): interactions are grouped in
            partitions of about memory_gb / BYTES_PER_ROW rows, spilled to disk in the output's
            temporary folder; the output is the same for any budget (docs/data.md).
    Raises DataError (one line naming the file, line and field) on bad input.
    """
    from hstu.data.data_args import CustomDataArgs, SyntheticDataArgs

    check_known_dataset(name)
    if not memory_gb > 0:
        raise DataError("--memory-gb", f"{memory_gb} is not a positive number of GiB")
    output_name = output_name or name
    check_output_name(name, output_name)
    out_dir = Path(out) / output_name
    log = print if verbose else (lambda *a, **k: None)
    started = time.perf_counter()
    src: RawSource | None = None
    options: dict[str, Any] = {"format_version": FORMAT_VERSION, "dataset": name}
    if name == "synthetic":
        synthetic = synthetic or SyntheticDataArgs()
        options["synthetic"] = dataclasses.asdict(synthetic)
        checksum = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
        source = {"path": None, "checksum": checksum}
    elif name == "custom":
        from hstu.data.custom import custom_files

        custom = custom or CustomDataArgs()
        if raw is not None:
            if custom.path is not None and Path(custom.path) != Path(raw):
                raise DataError(
                    "--raw",
                    f"{raw} differs from CustomDataArgs.path={custom.path!r}; give the input once",
                )
            custom = dataclasses.replace(custom, path=str(raw))
        options["custom"] = dataclasses.asdict(custom)
        options["keep_item_ids"] = custom.item_vocab_size is not None
        files = custom_files(custom)
        digest = hashlib.sha256()
        for f in files:
            digest.update(RawSource(f).checksum([f.name]).encode())
        source = {"path": str(custom.path), "checksum": digest.hexdigest()}
    else:
        if raw is None:
            log(f"downloading {DATASETS[name].url} ...")
            raw = download(name, Path(out) / "downloads")
        src = RawSource(raw)
        source = {"path": str(raw), "checksum": src.checksum(src.members)}

    removed = clean_stale_tmp(out_dir)
    if removed:
        log(f"removed folders of an interrupted preprocess run: {', '.join(removed)}")
    meta_path = out_dir / METADATA_FILE
    if not force and meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = {}
        if (
            old.get("source", {}).get("checksum") == source["checksum"]
            and old.get("options") == options
        ):
            log(f"{out_dir} is up to date (same source checksum and options); --force rebuilds it")
            log(format_stats(old))
            return old

    try:
        if name == "synthetic":
            from hstu.data.synthetic import generate_synthetic

            parsed = generate_synthetic(synthetic)
        elif name == "custom":
            from hstu.data.custom import read_custom

            parsed = read_custom(custom)
        else:
            assert src is not None
            parsed = load(DATASETS[name].reader)(src)  # streaming readers read in write()
        # the temporary output folder (fresh), with the spill folder of the grouping in it
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            grouping = Grouping(parsed, memory_gb * 2**30, tmp / SPILL_DIR)
            meta = write(grouping, tmp, out_dir, output_name, source, options)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if src is not None:
            src.close()
    seconds = time.perf_counter() - started
    log(format_stats(meta))
    if grouping.num_parts > 1:
        log(
            f"grouped in {grouping.num_parts} partitions of about {grouping.rows_per_part} "
            f"rows (--memory-gb {memory_gb:g})"
        )
    if grouping.dropped_users:
        log(
            f"note: dropped {grouping.dropped_users} users with < "
            f"{parsed.min_user_interactions} interactions"
        )
    if grouping.users_without_features:
        log(
            f"note: {grouping.users_without_features} users have no row in the user-feature "
            "file (their features are 0)"
        )
    log(
        f"wrote {out_dir} in {seconds:.2f}s "
        f"({meta['num_interactions'] / max(seconds, 1e-9) / 1e6:.2f} M interactions/s)"
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hstu.data.preprocess",
        description="Preprocess a dataset into <out>/<name>/.",
    )
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS.names())}")
    parser.add_argument(
        "--raw",
        default=None,
        help="archive (zip/tar.gz), folder or file; default downloads the official archive",
    )
    parser.add_argument("--out", default="tmp_data", help="parent output folder (default tmp_data)")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even when the output is up to date"
    )
    parser.add_argument(
        "--gin-file",
        action="append",
        default=[],
        help="gin file binding CustomDataArgs / SyntheticDataArgs",
    )
    parser.add_argument(
        "--gin-param",
        action="append",
        default=[],
        help="gin binding, e.g. 'CustomDataArgs.path=\"log.csv\"'",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="output folder and dataset name (default: --dataset); train with "
        "DatasetArgs.dataset_name = NAME",
    )
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=DEFAULT_MEMORY_GB,
        help="memory budget of the grouping in GiB (default %(default)g): larger inputs are "
        "grouped in partitions spilled to disk; the output does not depend on it",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        from hstu.args import ARG_CLASSES
        from hstu.data.data_args import DATA_ARG_CLASSES, CustomDataArgs, SyntheticDataArgs
        from hstu.gin_parsing import load_classes

        check_known_dataset(args.dataset)
        own_args = {"custom": [CustomDataArgs], "synthetic": [SyntheticDataArgs]}
        wanted = own_args.get(args.dataset, [])
        # the trainer's gin file may be given too: its classes are known, not built
        built = load_classes(
            args.gin_file, args.gin_param, wanted, known=(*ARG_CLASSES, *DATA_ARG_CLASSES)
        )
        preprocess(
            args.dataset,
            args.raw,
            args.out,
            args.force,
            custom=built.get("CustomDataArgs"),
            synthetic=built.get("SyntheticDataArgs"),
            verbose=not args.quiet,
            output_name=args.name,
            memory_gb=args.memory_gb,
        )
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
