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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hstu.args import ConfigError
from hstu.data.errors import DataError
from hstu.data.layout import FORMAT_VERSION, ITEM_MAP_FILE, METADATA_FILE, SEQUENCES_FILE
from hstu.data.parsing import encode_dense, lookup
from hstu.data.raw import RawSource, download
from hstu.data.sources import (
    ACTION_FEATURE,
    ITEM_FEATURE,
    USER_FEATURE,
    Parsed,
    _check_bound,
)
from hstu.registry import DATASETS, load


@dataclasses.dataclass
class Grouped:
    """Interactions grouped per user, chronological. Legend: U users, N interactions.

    offsets int64 [U+1]; items/timestamps int64 [N]; actions int64 [N] or None;
    contextual: name -> int64 [U] codes (0 = unknown); raw_users [U]; raw_items [num_items].
    """

    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    actions: np.ndarray | None
    contextual: dict[str, np.ndarray]
    contextual_vocab: dict[str, int]
    raw_users: np.ndarray
    item_ids: np.ndarray
    raw_items: np.ndarray
    num_items: int
    num_action_values: int | None
    dropped_users: int
    users_without_features: int
    action_kind: str = "classes"
    action_values: list | None = None


def check_dataset_name(name: str) -> None:
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


def group(parsed: Parsed) -> Grouped:
    """Checks ids, drops short users, encodes ids densely and sorts each user's interactions."""
    log = parsed.log
    if log.num_rows == 0:
        raise DataError(log.segments[0][0] if log.segments else "input", "no interactions")
    shown = parsed.column_names
    _check_bound(log, "user", parsed.max_user_id, "user", shown.get("user"))
    _check_bound(log, "item", parsed.max_item_id, "item", shown.get("item"))
    if "action" in log.data and parsed.num_action_values is not None:
        act = log.data["action"]
        bad = (act < 0) | (act >= parsed.num_action_values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise log.error(
                row,
                shown.get("action", "action"),
                f"action {act[row]} outside [0, {parsed.num_action_values})",
            )

    negative = log.data["time_key"] < 0
    if negative.any():
        row = int(np.flatnonzero(negative)[0])
        raise log.error(
            row,
            shown.get("time_key", "timestamp"),
            f"timestamp {log.data['time_key'][row]} is negative ({int(negative.sum())} interactions "
            "have one); fix the source or drop those rows",
        )

    users, raw_users = encode_dense(log.data["user"])
    counts = np.bincount(users, minlength=len(raw_users) + 1)
    short = counts < parsed.min_user_interactions
    short[0] = False
    dropped = int(short.sum())
    data = dict(log.data)
    if dropped:
        keep_rows = ~short[users]
        data = {k: v[keep_rows] for k, v in data.items()}
        if len(data["user"]) == 0:
            raise DataError(
                log.segments[0][0],
                f"every user has fewer than {parsed.min_user_interactions} interactions",
            )
        users, raw_users = encode_dense(data["user"])
    num_users = len(raw_users)
    if parsed.keep_item_ids:
        items = data["item"].astype(np.int64, copy=False)
        num_items = int(parsed.max_item_id) + 1
        item_ids = np.flatnonzero(np.bincount(items, minlength=num_items))
        raw_items = item_ids
    else:
        items, raw_items = encode_dense(data["item"])
        num_items = len(raw_items) + 1  # dense ids 1..N; 0 is never an item
        item_ids = np.arange(1, num_items)

    order = _stable_user_time_order(users, data["time_key"].astype(np.int64, copy=False), num_users)
    counts = np.bincount(users, minlength=num_users + 1)[1:]
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    items_sorted = items[order]
    timestamps = data["time_key"][order]
    if parsed.time_key_per_second != 1:
        timestamps //= parsed.time_key_per_second
    actions = data["action"][order] if "action" in data else None

    contextual: dict[str, np.ndarray] = {USER_FEATURE: np.arange(1, num_users + 1, dtype=np.int64)}
    vocab: dict[str, int] = {USER_FEATURE: num_users + 1}
    without = 0
    table = parsed.user_table
    if table is not None:
        _check_bound(table, "user", parsed.max_user_id, "user")
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
        codes = lookup(raw_users, tusers)  # 0 for users without interactions
        present = codes > 0
        without = num_users - int(present.sum())
        for name in parsed.user_feature_names:
            fcodes, funiq = encode_dense(table.data[name])
            column = np.zeros(num_users + 1, dtype=np.int64)
            column[codes[present]] = fcodes[present]
            contextual[name] = column[1:]
            vocab[name] = len(funiq) + 1
    for name, values in data.items():
        if name.startswith("ctx:"):
            last = order[offsets[1:] - 1]
            fcodes, funiq = encode_dense(values[last])
            contextual[name[4:]] = fcodes
            vocab[name[4:]] = len(funiq) + 1
    return Grouped(
        offsets,
        items_sorted,
        timestamps.astype(np.int64),
        actions,
        contextual,
        vocab,
        raw_users,
        item_ids,
        raw_items,
        num_items,
        parsed.num_action_values if actions is not None else None,
        dropped,
        without,
        parsed.action_kind,
        parsed.action_values,
    )


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
    if not out_dir.parent.is_dir():
        return removed
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


def write(grouped: Grouped, out_dir: Path, metadata: dict[str, Any]) -> None:
    """Writes the three files into a temporary sibling folder, then renames it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        cols: dict[str, pa.Array] = {
            USER_FEATURE: pa.array(grouped.contextual[USER_FEATURE]),
            "raw_user_id": pa.array(
                grouped.raw_users.tolist()
                if grouped.raw_users.dtype == object
                else grouped.raw_users
            ),
            "item_ids": _list_column(grouped.offsets, grouped.items),
            "timestamps": _list_column(grouped.offsets, grouped.timestamps),
        }
        if grouped.actions is not None:
            cols["actions"] = _list_column(grouped.offsets, grouped.actions)
        for name, values in grouped.contextual.items():
            if name != USER_FEATURE:
                cols[name] = pa.array(values)
        pq.write_table(
            pa.table(cols), tmp / SEQUENCES_FILE, compression="lz4", use_dictionary=False
        )
        raw_items = (
            grouped.raw_items.tolist() if grouped.raw_items.dtype == object else grouped.raw_items
        )
        pq.write_table(
            pa.table({"item_id": pa.array(grouped.item_ids), "raw_item_id": pa.array(raw_items)}),
            tmp / ITEM_MAP_FILE,
        )
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_metadata(
    name: str, grouped: Grouped, source: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "num_users": int(len(grouped.offsets) - 1),
        "num_items": int(grouped.num_items),
        "num_distinct_items": len(grouped.item_ids),
        "num_interactions": len(grouped.items),
        "item_feature_name": ITEM_FEATURE,
        "item_ids": "kept as declared, in [0, num_items)"
        if options.get("keep_item_ids")
        else "dense 1..num_items-1 in sorted raw-id order; 0 is never an item",
        "action_feature_name": ACTION_FEATURE if grouped.actions is not None else None,
        "num_action_values": grouped.num_action_values,
        "action_kind": grouped.action_kind if grouped.actions is not None else None,
        "action_values": grouped.action_values,
        "contextual_feature_names": list(grouped.contextual),
        "contextual_vocab_sizes": {k: int(v) for k, v in grouped.contextual_vocab.items()},
        "seqlen": seqlen_stats(grouped.offsets),
        "dropped_users": grouped.dropped_users,
        "users_without_features": grouped.users_without_features,
        "timestamp_unit": "s",
        "source": source,
        "options": options,
    }


def format_stats(meta: dict[str, Any]) -> str:
    s = meta["seqlen"]
    head = f"{'dataset':<14}{'#users':>9}{'seqlen max':>12}{'min':>6}{'mean':>9}{'median':>8}{'#items':>10}{'#interactions':>15}"
    row = (
        f"{meta['dataset']:<14}{meta['num_users']:>9}{s['max']:>12}{s['min']:>6}{s['mean']:>9.2f}"
        f"{s['median']:>8.0f}{meta['num_distinct_items']:>10}{meta['num_interactions']:>15}"
    )
    return head + "\n" + row


def _options_of(
    name: str, custom: Any, synthetic: Any, parsed_keep: bool = False
) -> dict[str, Any]:
    opts: dict[str, Any] = {"format_version": FORMAT_VERSION, "dataset": name}
    if name == "custom":
        opts["custom"] = dataclasses.asdict(custom)
    if name == "synthetic":
        opts["synthetic"] = dataclasses.asdict(synthetic)
    return opts


def preprocess(
    name: str,
    raw: str | Path | None = None,
    out: str | Path = "tmp_data",
    force: bool = False,
    custom: Any = None,
    synthetic: Any = None,
    verbose: bool = True,
    output_name: str | None = None,
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
    Raises DataError (one line naming the file, line and field) on bad input.
    """
    from hstu.data.data_args import CustomDataArgs, SyntheticDataArgs

    check_dataset_name(name)
    output_name = output_name or name
    check_output_name(name, output_name)
    out_dir = Path(out) / output_name
    log = print if verbose else (lambda *a, **k: None)
    started = time.perf_counter()
    src: RawSource | None = None
    if name == "synthetic":
        synthetic = synthetic or SyntheticDataArgs()
        options = _options_of(name, None, synthetic)
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
        options = _options_of(name, custom, None)
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
        options = _options_of(name, None, None)
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

    if name == "synthetic":
        from hstu.data.synthetic import generate_synthetic

        parsed = generate_synthetic(synthetic)
    elif name == "custom":
        from hstu.data.custom import read_custom

        parsed = read_custom(custom)
    else:
        assert src is not None
        try:
            parsed = load(DATASETS[name].reader)(src)
        finally:
            src.close()
    grouped = group(parsed)
    meta = build_metadata(output_name, grouped, source, options)
    write(grouped, out_dir, meta)
    seconds = time.perf_counter() - started
    log(format_stats(meta))
    notes = []
    if grouped.dropped_users:
        notes.append(
            f"dropped {grouped.dropped_users} users with < {parsed.min_user_interactions} interactions"
        )
    if grouped.users_without_features:
        notes.append(
            f"{grouped.users_without_features} users have no row in the user-feature file (their features are 0)"
        )
    for note in notes:
        log("note: " + note)
    log(
        f"wrote {out_dir} in {seconds:.2f}s ({meta['num_interactions'] / max(seconds, 1e-9) / 1e6:.2f} M interactions/s)"
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
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        from hstu.args import ARG_CLASSES
        from hstu.data.data_args import DATA_ARG_CLASSES, CustomDataArgs, SyntheticDataArgs
        from hstu.gin_parsing import load_classes

        check_dataset_name(args.dataset)
        wanted = {"custom": [CustomDataArgs], "synthetic": [SyntheticDataArgs]}.get(args.dataset, [])
        # the trainer's gin file may be given too: its classes are known, not built
        built = load_classes(
            args.gin_file, args.gin_param, wanted, known=(*ARG_CLASSES, *DATA_ARG_CLASSES)
        )
        custom = built.get("CustomDataArgs")
        synthetic = built.get("SyntheticDataArgs")
        preprocess(
            args.dataset,
            args.raw,
            args.out,
            args.force,
            custom=custom,
            synthetic=synthetic,
            verbose=not args.quiet,
            output_name=args.name,
        )
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
