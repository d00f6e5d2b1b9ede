"""Users' own interaction logs: CSV/TSV, JSON lines or parquet, columns mapped by CustomDataArgs.

Formats are told by the file name: ``.csv``/``.txt`` (comma unless CustomDataArgs.delimiter
says otherwise), ``.tsv`` (tab), ``.jsonl``/``.ndjson``/``.json`` (one JSON object per line),
and ``.parquet``, each optionally ``.gz``; or a ``.zip`` / ``.tar[.gz]`` / ``.tgz`` archive
holding one such file. Ids may be integers or text; timestamps are integers; actions are
numbers turned into classes (:func:`action_classes`). Columns left at their default names
also read the aliases of :mod:`hstu.columns` (``user`` for ``user_id``, ...), as serving does.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from hstu.columns import pick_column
from hstu.data.data_args import CustomDataArgs
from hstu.data.errors import DataError
from hstu.data.parsing import Columns, TextFormat, read_delimited
from hstu.data.raw import RawSource
from hstu.data.sources import Parsed

_TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
ROW_FEATURE_PREFIX = "ctx:"
MAX_ACTION_CLASSES = 256
"""Most distinct non-integer action values turned into one class each (else: action_bins)."""


def file_kind(path: Path | str) -> str | None:
    """"text", "json", "parquet" (each optionally .gz) or "archive" from the file name."""
    name = Path(path).name.lower()
    if name.endswith(_ARCHIVE_SUFFIXES):
        return "archive"
    name = name.removesuffix(".gz")
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return None


class _Input:
    """One file to read: a plain file, or the single data file of an archive. ``name`` is
    what messages say (``log.zip:events.csv`` for a member)."""

    def __init__(self, name: str, kind: str, read: Callable[[], bytes], gz: bool,
                 path: Path | None = None) -> None:
        self.name, self.kind, self._read, self.gz, self.path = name, kind, read, gz, path

    def read_bytes(self) -> bytes:
        raw = self._read()
        if self.gz:
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise DataError(self.name, f"truncated or corrupt gzip file ({exc})") from None
        return raw


def _inputs(path: Path, data: bytes | None = None, delimiter: str | None = None) -> _Input:
    """The file to read of ``path`` (an archive: its one data file, else an error naming them);
    ``data``: the file's bytes, already read (then the file is not opened again);
    ``delimiter`` (CustomDataArgs.delimiter): a file of another extension is delimited text."""
    kind = file_kind(path) or ("text" if delimiter is not None else None)
    gz = path.name.lower().endswith(".gz")
    if data is not None:
        assert kind in ("text", "json", "parquet"), path
        return _Input(str(path), kind, lambda: data, gz)
    if kind != "archive":
        assert kind is not None
        return _Input(str(path), kind, path.read_bytes, gz, path=None if gz else path)
    source = RawSource(path)  # zip or tar: a truncated archive is one line there
    data = [m for m in source.find("*") if file_kind(m) not in (None, "archive")]
    if len(data) != 1:
        found = ", ".join(source.members[:10]) + (", ..." if len(source.members) > 10 else "")
        what = "no" if not data else f"{len(data)}"
        raise DataError(
            str(path),
            f"{what} .csv/.tsv/.txt/.jsonl/.json/.ndjson/.parquet files in the {source.kind} "
            f"(members: {found or 'none'}); it must hold exactly one: extract the one to read",
        )
    member = data[0]
    return _Input(source.display(member), file_kind(member), lambda: source.read_bytes(member),
                  member.lower().endswith(".gz"))


def custom_files(args: CustomDataArgs) -> list[Path]:
    """The file itself, or the CSV/TSV/JSON-lines/parquet files of a folder in name order."""
    if args.path is None:
        raise DataError(
            "--raw",
            "no input file: pass --raw FILE (or set CustomDataArgs.path) for --dataset custom",
        )
    path = Path(args.path)
    if not path.exists():
        raise DataError(str(path), "no such file or folder")
    if path.is_file():
        if file_kind(path) is None and args.delimiter is None:
            raise DataError(
                str(path),
                "unknown format: name it .csv, .tsv, .txt, .jsonl, .json, .ndjson, .parquet "
                "(optionally .gz), or an archive (.zip, .tar, .tar.gz, .tgz) holding one such "
                "file, or set CustomDataArgs.delimiter to read it as delimited text",
            )
        return [path]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and file_kind(p) not in (None, "archive")
    )
    if not files:
        raise DataError(str(path), "folder holds no .csv/.tsv/.txt/.jsonl/.json/.parquet file")
    return files


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
                values = _whole(values, out, col)
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            values = np.asarray(arr.to_pylist(), dtype=object)
            if kind != "id":
                values = _parse_numbers(values, out, col, integer=kind == "int")
        else:
            raise DataError(str(path), f"unsupported column type {t}", field=col)
        out.data[col] = values
    return out


def _whole(floats: np.ndarray, cols: Columns, col: str) -> np.ndarray:
    """int64 of a float column whose every value is a whole number (exact below 2**53), else
    the error naming the first row that is not."""
    whole = np.isfinite(floats) & (floats == np.floor(floats)) & (np.abs(floats) < 2**53)
    if not whole.all():
        row = int(np.flatnonzero(~whole)[0])
        raise cols.error(row, col, f"expected an integer, got {floats[row]!r}")
    return floats.astype(np.int64)


def _parse_numbers(values: np.ndarray, cols: Columns, col: str, integer: bool) -> np.ndarray:
    text = values.astype(str)
    try:
        return np.asarray(text, dtype=np.int64 if integer else np.float64)
    except ValueError:
        pass
    if integer:  # whole numbers written as floats ("978300760.0", "3e2"): exact below 2**53
        try:
            floats = np.asarray(text, dtype=np.float64)
        except ValueError:
            floats = None
        if floats is not None:
            return _whole(floats, cols, col)
    for row, v in enumerate(text):
        try:
            float(v)
        except ValueError:
            what = "an integer" if integer else "a number"
            raise cols.error(row, col, f"expected {what}, got {str(v)[:40]!r}") from None
    raise AssertionError(f"{col}: numpy refused a column whose every value parses")


def _parquet_names(src: _Input) -> tuple[list[str], Any]:
    """(column names, what pyarrow reads: the file, or a buffer of the member's bytes)."""
    source = src.path if src.path is not None else pa.BufferReader(src.read_bytes())
    try:
        return pq.read_schema(source).names, source
    except (pa.ArrowException, OSError) as exc:
        raise DataError(src.name, f"truncated or corrupt parquet file ({exc})") from None


def _read_parquet(path: str, source: Any, names: list[str], columns: dict[str, str]) -> Columns:
    for col in columns:
        if col not in names:
            raise _missing(path, col, names)
    try:
        table = pq.read_table(source, columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"truncated or corrupt parquet file ({exc})") from None
    return _from_arrow(table, path, columns, first_line=0)


def _json_names(raw: bytes) -> list[str]:
    """The fields of the first line's object ([] if it is not one: the reader says so)."""
    first, _, _ = raw.lstrip().partition(b"\n")
    try:
        obj = json.loads(first)
    except ValueError:
        return []
    return list(obj) if isinstance(obj, dict) else []


def _text_names(raw: bytes, delimiter: str) -> list[str]:
    first = raw[: raw.find(b"\n")] if b"\n" in raw else raw
    text = first.decode("utf-8", "replace").rstrip("\r")
    return next(csv.reader(io.StringIO(text), delimiter=delimiter), [])


def _delimiter(name: str, args: CustomDataArgs) -> str:
    if args.delimiter is not None:
        return args.delimiter
    return "\t" if name.lower().removesuffix(".gz").endswith(".tsv") else ","


def _read_json_lines(path: str, raw: bytes, columns: dict[str, str]) -> Columns:
    """One JSON object per line. Fast path: pyarrow; a file whose fields change type between
    lines (an id that is a number here and a string there) or a malformed line goes through
    the Python reader, which names the bad line."""
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
    # integers when every value is one; else numbers (not ids) when all are, else text
    arrays = {}
    for col, kind in columns.items():
        vals = values[col]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            arrays[col] = pa.array(vals, pa.int64())
        elif kind != "id" and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals
        ):
            arrays[col] = pa.array([float(v) for v in vals], pa.float64())
        else:
            arrays[col] = pa.array([str(v) for v in vals], pa.string())
    return _from_arrow(pa.table(arrays), path, columns, first_line=1)


def _read_text(path: str, raw: bytes, columns: dict[str, str], args: CustomDataArgs) -> Columns:
    """Delimited text: ids are read as text, then turned into integers when all are integers."""
    delimiter = _delimiter(path, args)
    names = None
    if not args.has_header:
        first = raw[: raw.find(b"\n")] if b"\n" in raw[:65536] else raw
        names = [str(i) for i in range(first.count(delimiter.encode()) + 1)]
    # integers are read as floats, then checked whole: "978300760.0" is a timestamp too
    kinds = {"id": "str", "int": "float", "num": "float"}
    cols = read_delimited(
        raw,
        str(path),
        {c: kinds[k] for c, k in columns.items()},
        TextFormat(delimiter=delimiter, header=args.has_header, names=names, quoted=True),
    )
    for c, k in columns.items():
        if k == "int":
            cols.data[c] = _whole(cols.data[c], cols, c)
        if k == "id":
            try:
                cols.data[c] = np.asarray(cols.data[c].astype(str), dtype=np.int64)
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
        edges = np.asarray(bins, dtype=np.float64)
        return np.searchsorted(edges, values, side="right").astype(np.int64), None
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


def read_custom_file(
    path: Path, args: CustomDataArgs, optional_action: bool = False, data: bytes | None = None
) -> tuple[Columns, list[str], dict[str, str]]:
    """One file of a custom source, its mapped columns renamed (``user``, ``item``,
    ``time_key``, ``action`` when read, ``ctx:<column>``).

    Args:
        path: a CSV/TSV, JSON-lines or parquet file (optionally .gz), or an archive of one.
        args: the column mapping.
        optional_action: read ``args.action_column`` only when the file has it (the stream
            source's optional rating); False: a file without it is an error.
        data: the bytes of ``path`` (a data file, not an archive) when the caller read them
            already: parsed from memory, so every error is about the content, none an I/O one.
    Returns: (columns, the file's column names ([] for text without a header), role ->
        the file's column for user / item / timestamp).
    """
    src = _inputs(path, data, args.delimiter)
    raw = source = None
    if src.kind == "parquet":
        have, source = _parquet_names(src)
    else:
        raw = src.read_bytes()
        if src.kind == "json":
            have = _json_names(raw)
        else:
            have = _text_names(raw, _delimiter(src.name, args)) if args.has_header else []
    # the user / item / time columns: as configured, or (left at the default) an alias
    roles = {
        role: pick_column(role, have, configured) or configured
        for role, configured in (
            ("user", args.user_column),
            ("item", args.item_column),
            ("timestamp", args.timestamp_column),
        )
    }
    columns: dict[str, str] = {
        roles["user"]: "id",
        roles["item"]: "id",
        roles["timestamp"]: "int",
    }
    action = args.action_column
    if action and optional_action and action not in have:
        action = None
    if action:
        columns[action] = "num"
    for c in args.contextual_columns:
        columns[c] = "id"
    if src.kind == "parquet":
        cols = _read_parquet(src.name, source, have, columns)
    elif src.kind == "json":
        cols = _read_json_lines(src.name, raw, columns)
    else:
        cols = _read_text(src.name, raw, columns, args)
    renamed = {
        "user": cols.data[roles["user"]],
        "item": cols.data[roles["item"]],
        "time_key": cols.data[roles["timestamp"]].astype(np.int64),
    }
    if action:
        renamed["action"] = cols.data[action]
    for c in args.contextual_columns:
        renamed[ROW_FEATURE_PREFIX + c] = cols.data[c]
    cols.data = renamed
    return cols, have, roles


def read_custom(args: CustomDataArgs) -> Parsed:
    """Reads every file of the custom source and renames the mapped columns.

    User and item ids may be integers or text; timestamps must be integers; actions are
    numbers turned into classes (:func:`action_classes`). Contextual columns become log
    columns named ``ctx:<column>``; the preprocessor keeps each user's most recent value.
    """
    files = custom_files(args)
    parts = []
    used: dict[str, str] = {}
    for path in files:
        cols, _, used = read_custom_file(path, args)
        parts.append(cols)
    for k in parts[0].data:
        if len({p.data[k].dtype.kind in "iu" for p in parts}) > 1:  # integers in some files only
            for p in parts:  # ids become text, actions floats
                v = p.data[k]
                p.data[k] = v.astype(np.float64) if k == "action" else v.astype(str).astype(object)
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
        members=[_inputs(p, delimiter=args.delimiter).name for p in files],
        column_names={
            "user": used["user"],
            "item": used["item"],
            "time_key": used["timestamp"],
            "action": args.action_column or "action",
        },
    )


__all__ = [
    "MAX_ACTION_CLASSES", "ROW_FEATURE_PREFIX", "action_classes", "custom_files", "file_kind",
    "read_custom", "read_custom_file",
]
