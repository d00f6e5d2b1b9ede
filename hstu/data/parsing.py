"""Fast, checked parsing of delimited text into numpy columns, and dense id encoding.

The fast path is ``pyarrow.csv`` (multithreaded, typed). When it rejects a file, a slow
diagnostic pass finds the first bad line so the error can name it; the happy path never
loops over rows in Python.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from hstu.data.errors import DataError

_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
# Multi-character separators (MovieLens "::") are rewritten to this byte before parsing.
_SUBSTITUTE_SEP = "\x1f"
_BOM = b"\xef\xbb\xbf"


@dataclass
class Columns:
    """Parsed columns of one or more files, with enough bookkeeping to name a bad line.

    Row r of the concatenation sits in segment s (the last with start <= r) at line
    ``r - start + first_line``.
    """

    data: dict[str, np.ndarray]
    segments: list[tuple[str, int, int]] = field(default_factory=list)
    """(file display name, first row index, line number of that row)."""

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0

    def locate(self, row: int) -> tuple[str, int]:
        starts = [s[1] for s in self.segments]
        seg = int(np.searchsorted(np.asarray(starts), row, side="right")) - 1
        name, start, first_line = self.segments[seg]
        return name, int(row - start + first_line)

    def error(self, row: int, field_name: str, message: str) -> DataError:
        name, line = self.locate(row)
        return DataError(name, message, line=line, field=field_name)

    @staticmethod
    def concat(parts: list[Columns]) -> Columns:
        if len(parts) == 1:
            return parts[0]
        data = {k: np.concatenate([p.data[k] for p in parts]) for k in parts[0].data}
        segments, offset = [], 0
        for p in parts:
            segments += [(n, s + offset, l) for n, s, l in p.segments]
            offset += p.num_rows
        return Columns(data, segments)


@dataclass(frozen=True)
class TextFormat:
    """How a delimited file is written."""

    delimiter: str
    """Field separator (several characters allowed in read_delimited, e.g. MovieLens "::")."""
    header: bool
    """The first line names the columns (else ``names`` does, by position)."""
    names: list[str] | None = None
    """Column names by position when ``header`` is False."""
    quoted: bool = False
    """Honour double quotes, RFC 4180 style (custom CSV, KuaiRand's user features quote their
    ranges such as "[10,50)"); MovieLens has none."""


@dataclass
class _Layout:
    """What both readers derive from a file's first line: its column names and the options
    pyarrow parses it with."""

    names: list[str]
    read: pacsv.ReadOptions
    parse: pacsv.ParseOptions
    convert: pacsv.ConvertOptions
    first_line: int
    """Line number of the first row (2 after a header)."""


def _layout(
    first: bytes, where: str, columns: dict[str, str], sep: str, fmt: TextFormat, block_size: int
) -> _Layout:
    """The layout of a file whose first line (BOM removed) is ``first``, its column names (from
    that line when ``fmt.header``, else ``fmt.names``) checked against the wanted ``columns``."""
    if not first.strip():
        raise DataError(where, "file is empty")
    if fmt.header:
        text = first.rstrip(b"\n").rstrip(b"\r").decode("utf-8", "replace")
        if fmt.quoted:
            file_names = [c.strip() for c in next(csv.reader([text], delimiter=sep))]
        else:
            file_names = [c.strip().strip('"') for c in text.split(sep)]
    else:
        assert fmt.names is not None
        file_names = list(fmt.names)
    for col in columns:
        if col not in file_names:
            from hstu.args import did_you_mean

            where_cols = "header" if fmt.header else "column mapping"
            raise DataError(
                where,
                f"missing column (the {where_cols} has {', '.join(file_names)})"
                + did_you_mean(col, file_names),
                line=1 if fmt.header else None,
                field=col,
            )
    read = pacsv.ReadOptions(column_names=file_names, skip_rows=1 if fmt.header else 0,
                             use_threads=True, block_size=block_size)
    parse = pacsv.ParseOptions(
        delimiter=sep, quote_char='"' if fmt.quoted else False, ignore_empty_lines=False
    )
    convert = pacsv.ConvertOptions(
        column_types={c: _TYPES[t] for c, t in columns.items()},
        include_columns=list(columns),
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=True,
    )
    return _Layout(file_names, read, parse, convert, 2 if fmt.header else 1)


def read_delimited(raw: bytes, where: str, columns: dict[str, str], fmt: TextFormat) -> Columns:
    """Parses delimited text into the requested typed columns.

    Args:
        raw: file contents.
        where: file name for messages.
        columns: wanted column name -> "int" | "float" | "str".
        fmt: how the file is written.

    A UTF-8 byte order mark and CRLF line ends are accepted.

    Returns: Columns with one numpy array per wanted column (str columns as object arrays).
    Empty values are errors naming the line and field.
    """
    raw = raw.removeprefix(_BOM)
    if len(fmt.delimiter) > 1:
        raw = raw.replace(fmt.delimiter.encode(), _SUBSTITUTE_SEP.encode())
        sep = _SUBSTITUTE_SEP
    else:
        sep = fmt.delimiter
    end = raw.find(b"\n")
    lay = _layout(raw if end < 0 else raw[:end], where, columns, sep, fmt, 1 << 24)
    try:
        table = pacsv.read_csv(pa.BufferReader(raw), lay.read, lay.parse, lay.convert)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        lines = raw.decode("utf-8", "replace").removesuffix("\n").split("\n")
        _diagnose(lines, where, sep, lay.names, columns, lay.first_line, fmt.quoted)
        raise DataError(where, f"cannot parse ({str(exc).splitlines()[0]})") from None
    return _to_columns(table, columns, where, lay.first_line)


def _diagnose(
    lines: Iterable[str],
    where: str,
    sep: str,
    names: list[str],
    columns: dict[str, str],
    first_line: int,
    quoted: bool,
) -> None:
    """Slow path after a parse failure: raises DataError at the first bad line of `lines`
    (the file's lines from its first, without their line ends)."""
    index = {c: names.index(c) for c in columns}
    for k, line in enumerate(itertools.islice(lines, first_line - 1, None)):
        lineno = k + first_line
        if quoted:
            fields = next(csv.reader([line.rstrip("\r")], delimiter=sep), [])
        else:
            fields = line.rstrip("\r").split(sep)
        if len(fields) != len(names):
            raise DataError(
                where,
                f"expected {len(names)} fields, got {len(fields)}: {line[:80]!r}",
                line=lineno,
            )
        for col, kind in columns.items():
            value = fields[index[col]]
            if value == "":
                raise DataError(where, "empty value", line=lineno, field=col)
            if kind in ("int", "float"):
                try:
                    int(value) if kind == "int" else float(value)
                except ValueError:
                    raise DataError(
                        where,
                        f"expected {'an integer' if kind == 'int' else 'a number'}, "
                        f"got {value[:40]!r}",
                        line=lineno,
                        field=col,
                    ) from None


def iter_delimited(
    open_binary: Callable[[], BinaryIO], where: str, columns: dict[str, str], fmt: TextFormat,
    block_size: int = 1 << 25,
) -> Iterator[Columns]:
    """Streams a delimited file as blocks of typed columns (bounded memory: one block of
    about `block_size` bytes of text at a time). Same rules and errors as read_delimited.

    Args:
        open_binary: opens the file for reading from its start (called once for the header,
            once for the rows, and once more only to name the bad line after a parse failure).
        fmt: a one-character delimiter (a multi-character one goes through read_delimited).
        Others as read_delimited.

    Yields: Columns per block, each with one segment (where, 0, line of its first row).
    """
    assert len(fmt.delimiter) == 1, (
        f"iter_delimited takes a one-character delimiter, not {fmt.delimiter!r}"
    )
    with open_binary() as fh:
        first = fh.readline(1 << 20).removeprefix(_BOM)
    lay = _layout(first, where, columns, fmt.delimiter, fmt, block_size)
    line = lay.first_line
    with open_binary() as fh:
        try:
            for batch in pacsv.open_csv(fh, lay.read, lay.parse, lay.convert):
                block = _to_columns(batch, columns, where, line)
                line += batch.num_rows
                yield block
            if line == lay.first_line:  # no rows: one empty block still names the file
                empty = pa.table({c: pa.array([], _TYPES[t]) for c, t in columns.items()})
                yield _to_columns(empty, columns, where, line)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            message = str(exc).splitlines()[0]
        else:
            return
    with open_binary() as fh:
        lines = (
            raw.decode("utf-8", "replace").rstrip("\n").removeprefix("\ufeff")
            for raw in fh
        )
        _diagnose(lines, where, fmt.delimiter, lay.names, columns, lay.first_line, fmt.quoted)
    raise DataError(where, f"cannot parse ({message})")


def _to_columns(
    table: pa.Table | pa.RecordBatch, columns: dict[str, str], where: str, first_line: int
) -> Columns:
    data: dict[str, np.ndarray] = {}
    out = Columns(data, [(where, 0, first_line)])
    for col in columns:
        arr = table.column(col)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if arr.null_count:
            row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise out.error(row, col, "empty value")
        data[col] = arr.to_numpy(zero_copy_only=False)
    return out


# ------------------------------------------------------------------------- dense codes


def encode_dense(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps values to dense codes 1..K in sorted order of the distinct values (0 stays free).

    Args: values [N] (integers or strings).
    Returns: (codes int64 [N] in 1..K, uniques [K] sorted).
    Contiguous integer ids 1..K keep their value (MovieLens ids are unchanged).
    """
    if values.dtype.kind in "iu":
        values = values.astype(np.int64, copy=False)
        if len(values) == 0:
            return values.copy(), values.copy()
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi < max(1 << 26, 4 * len(values)):
            present = np.zeros(hi + 1, dtype=np.int64)
            present[values] = 1
            rank = np.cumsum(present)
            return rank[values], np.flatnonzero(present)
        uniques, inverse = np.unique(values, return_inverse=True)
        return inverse.astype(np.int64) + 1, uniques
    arr = pa.array(values, type=pa.string()) if not isinstance(values, pa.Array) else values
    enc = arr.dictionary_encode()
    dictionary = np.asarray(enc.dictionary.to_pylist(), dtype=object)
    order = np.argsort(dictionary.astype(str), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    codes = rank[enc.indices.to_numpy(zero_copy_only=False)]
    return codes, dictionary[order]


def lookup(uniques: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Codes (1-based positions in sorted `uniques`) of `values`; 0 where absent.

    Shapes: uniques [K] sorted, values [M] -> int64 [M].
    """
    if len(uniques) == 0:
        return np.zeros(len(values), dtype=np.int64)
    if uniques.dtype.kind in "iu" and values.dtype.kind not in "iu":
        raise DataError("lookup", "id types differ between files (integer vs text)")
    keys = uniques.astype(str) if uniques.dtype == object else uniques
    vals = values.astype(str) if values.dtype == object or keys.dtype.kind == "U" else values
    pos = np.searchsorted(keys, vals)
    pos_c = np.minimum(pos, len(keys) - 1)
    found = keys[pos_c] == vals
    return np.where(found, pos_c + 1, 0).astype(np.int64)


__all__ = ["Columns", "TextFormat", "encode_dense", "iter_delimited", "lookup", "read_delimited"]
