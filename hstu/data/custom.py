"""Users' own interaction logs: CSV/TSV, JSON lines or parquet, columns mapped by CustomDataArgs.

Formats are told by the file name: ``.csv``/``.txt`` (comma unless CustomDataArgs.delimiter
says otherwise), ``.tsv`` (tab), ``.jsonl``/``.ndjson``/``.json`` (one JSON object per line),
each optionally ``.gz``, and ``.parquet``. Ids may be integers or text; timestamps are
integers; actions are numbers turned into classes (:func:`action_classes`).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from hstu.data.data_args import CustomDataArgs
from hstu.data.errors import DataError
from hstu.data.parsing import Columns, read_delimited
from hstu.data.sources import Parsed

_TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
ROW_FEATURE_PREFIX = "ctx:"
MAX_ACTION_CLASSES = 256
"""Most distinct non-integer action values turned into one class each (else: action_bins)."""


def file_kind(path: Path) -> str | None:
    """"text", "json" or "parquet" from the file name (a trailing .gz is allowed for text)."""
    name = path.name.lower()
    name = name.removesuffix(".gz")
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(".parquet") and not path.name.lower().endswith(".gz"):
        return "parquet"
    return None


def custom_files(args: CustomDataArgs) -> list[Path]:
    """The file itself, or the CSV/TSV/JSON-lines/parquet files of a folder in name order."""
    if args.path is None:
        raise DataError(
            "--raw", "no input file: pass --raw FILE (or set CustomDataArgs.path) for --dataset custom"
        )
    path = Path(args.path)
    if not path.exists():
        raise DataError(str(path), "no such file or folder")
    if path.is_file():
        if file_kind(path) is None:
            raise DataError(
                str(path),
                "unknown format: name it .csv, .tsv, .txt, .jsonl, .json, .ndjson (optionally .gz) "
                "or .parquet",
            )
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and file_kind(p) is not None)
    if not files:
        raise DataError(str(path), "folder holds no .csv/.tsv/.txt/.jsonl/.json/.parquet file")
    return files


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(str(path), f"truncated or corrupt gzip file ({exc})") from None
    return raw


def _missing(path: Path, col: str, have: list[str], line: int | None = None) -> DataError:
    from hstu.validation import did_you_mean

    return DataError(
        str(path),
        f"missing column (the file has {', '.join(have)})" + did_you_mean(col, have),
        line=line,
        field=col,
    )


def _from_arrow(table: pa.Table, path: Path, columns: dict[str, str], first_line: int) -> Columns:
    """Typed numpy columns from an arrow table. kinds: id (integers or text), int, num."""
    out = Columns({}, [(str(path), 0, first_line)])
    for col, kind in columns.items():
        if col not in table.column_names:
            raise _missing(path, col, table.column_names)
        arr = table.column(col).combine_chunks()
        if arr.null_count:
            row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise out.error(row, col, "empty value")
        t = arr.type
        if pa.types.is_integer(t):
            values = arr.to_numpy(zero_copy_only=False).astype(np.int64)
        elif pa.types.is_floating(t) or pa.types.is_decimal(t):
            values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
            if kind in ("id", "int"):
                frac = values != np.floor(values)
                if frac.any():
                    row = int(np.flatnonzero(frac)[0])
                    raise out.error(row, col, f"expected an integer, got {values[row]!r}")
                values = values.astype(np.int64)
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            values = np.asarray(arr.to_pylist(), dtype=object)
            if kind != "id":
                values = _parse_numbers(values, out, col, integer=kind == "int")
        else:
            raise DataError(str(path), f"unsupported column type {t}", field=col)
        out.data[col] = values
    return out


def _parse_numbers(values: np.ndarray, cols: Columns, col: str, integer: bool) -> np.ndarray:
    try:
        return np.asarray(values.astype(str), dtype=np.int64 if integer else np.float64)
    except ValueError:
        for row, v in enumerate(values):
            try:
                int(v) if integer else float(v)
            except ValueError:
                what = "an integer" if integer else "a number"
                raise cols.error(row, col, f"expected {what}, got {str(v)[:40]!r}") from None
        raise


def _read_parquet(path: Path, columns: dict[str, str]) -> Columns:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"truncated or corrupt parquet file ({exc})") from None
    for col in columns:
        if col not in schema.names:
            raise _missing(path, col, schema.names)
    try:
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"truncated or corrupt parquet file ({exc})") from None
    return _from_arrow(table, path, columns, first_line=0)


def _read_json_lines(path: Path, columns: dict[str, str]) -> Columns:
    """One JSON object per line. Fast path: pyarrow; a file whose fields change type between
    lines (an id that is a number here and a string there) or a malformed line goes through
    the Python reader, which names the bad line."""
    raw = _read_bytes(path)
    if not raw.strip():
        raise DataError(str(path), "file is empty")
    try:
        table = pajson.read_json(pa.BufferReader(raw))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _read_json_lines_slow(path, raw, columns)
    if any(c not in table.column_names or table.column(c).null_count for c in columns):
        return _read_json_lines_slow(path, raw, columns)  # names the line missing a field
    return _from_arrow(table, path, columns, first_line=1)


def _read_json_lines_slow(path: Path, raw: bytes, columns: dict[str, str]) -> Columns:
    lines = raw.decode("utf-8", "replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    values: dict[str, list] = {c: [] for c in columns}
    for lineno, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(str(path), f"not a JSON object ({exc.msg})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(str(path), f"not a JSON object: {line[:60]!r}", line=lineno)
        for col in columns:
            if col not in obj:
                raise _missing(path, col, list(obj), line=lineno)
            v = obj[col]
            if v is None or v == "":
                raise DataError(str(path), "empty value", line=lineno, field=col)
            values[col].append(v)
    # ids: integers when every value is one, else text (as for CSV)
    arrays = {}
    for col, kind in columns.items():
        vals = values[col]
        if kind == "id" and not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            arrays[col] = pa.array([str(v) for v in vals], pa.string())
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            arrays[col] = pa.array(vals, pa.int64())
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            arrays[col] = pa.array([float(v) for v in vals], pa.float64())
        else:
            arrays[col] = pa.array([str(v) for v in vals], pa.string())
    return _from_arrow(pa.table(arrays), path, columns, first_line=1)


def _read_text(path: Path, columns: dict[str, str], args: CustomDataArgs) -> Columns:
    """Delimited text: ids are read as text, then turned into integers when all are integers."""
    raw = _read_bytes(path)
    delimiter = args.delimiter
    if delimiter is None:
        stem = path.name.lower().removesuffix(".gz")
        delimiter = "\t" if stem.endswith(".tsv") else ","
    names = None
    if not args.has_header:
        first = raw[: raw.find(b"\n")] if b"\n" in raw[:65536] else raw
        names = [str(i) for i in range(first.count(delimiter.encode()) + 1)]
    kinds = {"id": "str", "int": "int", "num": "float"}
    cols = read_delimited(
        raw,
        str(path),
        {c: kinds[k] for c, k in columns.items()},
        delimiter=delimiter,
        header=args.has_header,
        names=names,
        quoted=True,
    )
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


def action_classes(
    values: np.ndarray, log: Columns, column: str, bins: list[float] | None
) -> tuple[np.ndarray, list[float] | None]:
    """Raw action values [N] -> (class int64 [N], raw value of each class or None).

    - ``bins`` (increasing edges): class = number of edges <= value (np.searchsorted right).
    - integers (also 4.0): the class is the value itself (must be >= 0).
    - other numbers (half stars 0.5 .. 5.0): one class per distinct value, ascending (at most
      MAX_ACTION_CLASSES distinct values; more need ``bins``); the raw values are returned.
    """
    if values.dtype.kind in "iu":
        values = values.astype(np.int64)
        if bins is None:
            if (values < 0).any():
                row = int(np.flatnonzero(values < 0)[0])
                raise log.error(row, column, f"negative action {values[row]}")
            return values, None
    values = values.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise log.error(row, column, f"action {values[row]} is not a finite number")
    if bins is not None:
        return np.searchsorted(np.asarray(bins, dtype=np.float64), values, side="right").astype(np.int64), None
    if (values == np.floor(values)).all():
        return action_classes(values.astype(np.int64), log, column, None)
    uniq = np.unique(values)
    if len(uniq) > MAX_ACTION_CLASSES:
        raise DataError(
            log.segments[0][0],
            f"{len(uniq)} distinct non-integer actions (more than {MAX_ACTION_CLASSES} classes); "
            "set CustomDataArgs.action_bins to bin them, e.g. [2.5, 3.5, 4.5]",
            field=column,
        )
    return np.searchsorted(uniq, values).astype(np.int64), [float(v) for v in uniq]


def read_custom(args: CustomDataArgs) -> Parsed:
    """Reads every file of the custom source and renames the mapped columns.

    User and item ids may be integers or text; timestamps must be integers; actions are
    numbers turned into classes (:func:`action_classes`). Contextual columns become log
    columns named ``ctx:<column>``; the preprocessor keeps each user's most recent value.
    """
    columns: dict[str, str] = {
        args.user_column: "id",
        args.item_column: "id",
        args.timestamp_column: "int",
    }
    if args.action_column:
        columns[args.action_column] = "num"
    for c in args.contextual_columns:
        columns[c] = "id"
    files = custom_files(args)
    parts = []
    for path in files:
        kind = file_kind(path)
        if kind == "parquet":
            cols = _read_parquet(path, columns)
        elif kind == "json":
            cols = _read_json_lines(path, columns)
        else:
            cols = _read_text(path, columns, args)
        renamed = {
            "user": cols.data[args.user_column],
            "item": cols.data[args.item_column],
            "time_key": cols.data[args.timestamp_column].astype(np.int64),
        }
        if args.action_column:
            renamed["action"] = cols.data[args.action_column]
        for c in args.contextual_columns:
            renamed[ROW_FEATURE_PREFIX + c] = cols.data[c]
        cols.data = renamed
        parts.append(cols)
    kinds = {k: {p.data[k].dtype.kind in "iu" for p in parts} for k in parts[0].data}
    for k, kind in kinds.items():
        if len(kind) > 1 and k != "action":  # integer ids in one file and text in another
            for p in parts:
                p.data[k] = p.data[k].astype(str).astype(object)
    if args.action_column and len(kinds["action"]) > 1:
        for p in parts:
            p.data["action"] = p.data["action"].astype(np.float64)
    log = Columns.concat(parts)
    num_actions, action_values = None, None
    if args.action_column:
        act, action_values = action_classes(
            log.data["action"], log, args.action_column, args.action_bins
        )
        log.data["action"] = act
        if args.num_action_values is not None and len(act) and act.max() >= args.num_action_values:
            row = int(np.flatnonzero(act >= args.num_action_values)[0])
            raise log.error(
                row,
                args.action_column,
                f"action class {act[row]} overflows num_action_values={args.num_action_values}",
            )
        num_actions = args.num_action_values or int(act.max()) + 1
        if args.action_bins is not None and args.num_action_values is None:
            num_actions = len(args.action_bins) + 1
    keep = args.item_vocab_size is not None
    if keep and log.data["item"].dtype.kind not in "iu":
        raise DataError(
            str(args.path),
            "item ids must be integers when item_vocab_size is declared",
            field=args.item_column,
        )
    return Parsed(
        log,
        time_key_per_second=1000 if args.timestamp_unit == "ms" else 1,
        num_action_values=num_actions,
        action_values=action_values,
        max_item_id=(args.item_vocab_size - 1) if keep else None,
        keep_item_ids=keep,
        min_user_interactions=args.min_user_interactions,
        members=[str(p) for p in files],
        column_names={
            "user": args.user_column,
            "item": args.item_column,
            "time_key": args.timestamp_column,
            "action": args.action_column or "action",
        },
    )


__all__ = ["MAX_ACTION_CLASSES", "ROW_FEATURE_PREFIX", "action_classes", "custom_files", "file_kind", "read_custom"]
