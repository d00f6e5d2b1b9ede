"""Users' own interaction logs: CSV or parquet with columns mapped by CustomDataArgs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hstu.data.data_args import CustomDataArgs
from hstu.data.errors import DataError
from hstu.data.parsing import Columns, read_delimited
from hstu.data.sources import Parsed

_TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")
ROW_FEATURE_PREFIX = "ctx:"


def custom_files(args: CustomDataArgs) -> list[Path]:
    """The file itself, or the CSV/parquet files of a folder in name order."""
    path = Path(args.path)
    if not path.exists():
        raise DataError(str(path), "no such file or folder (CustomDataArgs.path)")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.name.endswith(_TEXT_SUFFIXES) or p.suffix == ".parquet")
    )
    if not files:
        raise DataError(str(path), "folder holds no .csv/.tsv/.txt/.parquet file")
    return files


def _read_parquet(path: Path, columns: dict[str, str]) -> Columns:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"truncated or corrupt parquet file ({exc})") from None
    for col in columns:
        if col not in schema.names:
            from hstu.args import did_you_mean

            raise DataError(
                str(path),
                f"missing column (the file has {', '.join(schema.names)})"
                + did_you_mean(col, schema.names),
                field=col,
            )
    try:
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"truncated or corrupt parquet file ({exc})") from None
    out = Columns({}, [(f"{path} row", 0, 1)])
    for col, kind in columns.items():
        arr = table.column(col).combine_chunks()
        if arr.null_count:
            row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise out.error(row, col, "empty value")
        if kind == "int" and not pa.types.is_integer(arr.type):
            raise DataError(str(path), f"expected integers, column type is {arr.type}", field=col)
        out.data[col] = arr.to_numpy(zero_copy_only=False)
    return out


def _read_text(path: Path, columns: dict[str, str], args: CustomDataArgs) -> Columns:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        import gzip

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(str(path), f"truncated or corrupt gzip file ({exc})") from None
    names = None
    if not args.has_header:
        first = raw[: raw.find(b"\n")] if b"\n" in raw[:65536] else raw
        names = [str(i) for i in range(first.count(args.delimiter.encode()) + 1)]
    return read_delimited(
        raw,
        str(path),
        columns,
        delimiter=args.delimiter,
        header=args.has_header,
        names=names,
        quoted=True,
    )


def read_custom(args: CustomDataArgs) -> Parsed:
    """Reads every file of the custom source and renames the mapped columns.

    User and item ids may be integers or text; timestamps and actions must be integers.
    Contextual columns become log columns named ``ctx:<column>``; the preprocessor keeps
    each user's most recent value.
    """
    columns: dict[str, str] = {
        args.user_column: "id",
        args.item_column: "id",
        args.timestamp_column: "int",
    }
    if args.action_column:
        columns[args.action_column] = "int"
    for c in args.contextual_columns:
        columns[c] = "id"
    parts = []
    for path in custom_files(args):
        if path.suffix == ".parquet":
            cols = _read_parquet(
                path, {c: ("int" if k == "int" else "any") for c, k in columns.items()}
            )
        else:
            cols = _read_id_text(path, columns, args)
        renamed = {
            "user": cols.data[args.user_column],
            "item": cols.data[args.item_column],
            "time_key": cols.data[args.timestamp_column].astype(np.int64),
        }
        if args.action_column:
            renamed["action"] = cols.data[args.action_column].astype(np.int64)
        for c in args.contextual_columns:
            renamed[ROW_FEATURE_PREFIX + c] = cols.data[c]
        cols.data = renamed
        parts.append(cols)
    kinds = {k: {p.data[k].dtype.kind in "iu" for p in parts} for k in parts[0].data}
    for k, kind in kinds.items():
        if len(kind) > 1:  # integer ids in one file and text in another: compare as text
            for p in parts:
                p.data[k] = p.data[k].astype(str).astype(object)
    log = Columns.concat(parts)
    if args.action_column:
        act = log.data["action"]
        if (act < 0).any():
            row = int(np.flatnonzero(act < 0)[0])
            raise log.error(row, args.action_column, f"negative action {act[row]}")
        if args.num_action_values is not None and len(act) and act.max() >= args.num_action_values:
            row = int(np.flatnonzero(act >= args.num_action_values)[0])
            raise log.error(
                row,
                args.action_column,
                f"action {act[row]} overflows num_action_values={args.num_action_values}",
            )
    num_actions = None
    if args.action_column:
        num_actions = args.num_action_values or int(log.data["action"].max()) + 1
    keep = args.item_vocab_size is not None
    if keep and log.data["item"].dtype.kind not in "iu":
        raise DataError(
            args.path,
            "item ids must be integers when item_vocab_size is declared",
            field=args.item_column,
        )
    return Parsed(
        log,
        time_key_per_second=1000 if args.timestamp_unit == "ms" else 1,
        num_action_values=num_actions,
        max_item_id=(args.item_vocab_size - 1) if keep else None,
        keep_item_ids=keep,
        min_user_interactions=args.min_user_interactions,
        members=[str(p) for p in custom_files(args)],
        column_names={
            "user": args.user_column,
            "item": args.item_column,
            "time_key": args.timestamp_column,
            "action": args.action_column or "action",
        },
    )


def _read_id_text(path: Path, columns: dict[str, str], args: CustomDataArgs) -> Columns:
    """Text columns: ids are read as text, then turned into integers when all are integers."""
    cols = _read_text(path, {c: ("int" if k == "int" else "str") for c, k in columns.items()}, args)
    for c, k in columns.items():
        if k == "id":
            values = cols.data[c]
            try:
                as_int = (
                    np.asarray(values.astype(str), dtype=np.int64)
                    if len(values)
                    else values.astype(np.int64)
                )
                cols.data[c] = as_int
            except (ValueError, OverflowError):
                pass
    return cols


__all__ = ["ROW_FEATURE_PREFIX", "custom_files", "read_custom"]
