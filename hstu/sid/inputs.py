"""Where the tokenizer's item vectors come from: (a) an item file's text columns embedded offline
(TF-IDF, then a truncated SVD, rows L2-normalised), (b) a file of item vectors, (c) the item
table of a trained checkpoint (collaborative vectors). Every bad input is one
:class:`hstu.data.errors.DataError` line naming the file and the field.

Item files are CSV/TSV/TXT (a header line; comma, tab for .tsv), JSON lines or parquet, each
optionally .gz; MovieLens-100K's ``u.item`` (no header, ``|``, latin-1) is read by its name
with the columns item_id, title, release_date, video_release_date, url and genres (the names
of its genre flags, ``|``-joined). Text values may be empty (an item without a description);
ids may not.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from hstu.data.custom import file_kind
from hstu.data.errors import DataError
from hstu.validation import did_you_mean

ML100K_ITEM_COLUMNS = ["item_id", "title", "release_date", "video_release_date", "url"]
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]


def _missing(path: Path, col: str, have: list[str]) -> DataError:
    return DataError(str(path), f"missing column (the file has {', '.join(have)})"
                     + did_you_mean(col, have), field=col)


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(str(path), f"truncated or corrupt gzip file ({exc})") from None
    return raw


def _ml100k_items(path: Path) -> pa.Table:
    """MovieLens-100K's u.item: the genre flags become one ``|``-joined genres column."""
    genres = ML100K_GENRES
    genre_file = path.with_name("u.genre")
    if genre_file.is_file():
        names = [ln.rsplit("|", 1)[0] for ln in genre_file.read_text("latin-1").splitlines()
                 if ln.strip()]
        genres = names or genres
    rows = []
    for lineno, line in enumerate(path.read_text("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != len(ML100K_ITEM_COLUMNS) + len(genres):
            raise DataError(str(path), f"{len(parts)} fields, expected "
                            f"{len(ML100K_ITEM_COLUMNS) + len(genres)}", line=lineno)
        flags = parts[len(ML100K_ITEM_COLUMNS):]
        rows.append(parts[: len(ML100K_ITEM_COLUMNS)]
                    + ["|".join(g for g, f in zip(genres, flags) if f.strip() == "1")])
    names = [*ML100K_ITEM_COLUMNS, "genres"]
    return pa.table({n: pa.array([r[i] for r in rows], pa.string()) for i, n in enumerate(names)})


def _read_table(path: Path, columns: list[str], delimiter: str | None) -> tuple[pa.Table, int]:
    """The file's ``columns`` as an arrow table, and the line number of its first row (0 for
    parquet: messages then say ``row``)."""
    if path.name == "u.item":
        table = _ml100k_items(path)
        first_line = 1
    else:
        kind = file_kind(path)
        if kind in (None, "archive"):
            raise DataError(str(path), "unknown format: name it .csv, .tsv, .txt, .jsonl, .json, "
                            ".ndjson or .parquet (optionally .gz), or u.item (MovieLens-100K)")
        if kind == "parquet":
            try:
                table = pq.read_table(io.BytesIO(_read_bytes(path)))
            except (pa.ArrowException, OSError) as exc:
                raise DataError(str(path), f"truncated or corrupt parquet file ({exc})") from None
            first_line = 0
        elif kind == "json":
            raw = _read_bytes(path)
            if not raw.strip():
                raise DataError(str(path), "file is empty")
            try:
                table = pajson.read_json(pa.BufferReader(raw))
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                table = _json_slow(path, raw)
            first_line = 1
        else:
            raw = _read_bytes(path).removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                raise DataError(str(path), "file is empty")
            sep = delimiter or ("\t" if path.name.lower().removesuffix(".gz").endswith(".tsv")
                                else ",")
            try:
                table = pacsv.read_csv(
                    pa.BufferReader(raw),
                    parse_options=pacsv.ParseOptions(delimiter=sep),
                    convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in columns},
                        strings_can_be_null=True, null_values=[""]),
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                msg = str(exc).splitlines()[0]
                if "not found" in msg.lower() and "column" in msg.lower():
                    have = raw.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
                    names = [c.strip().strip('"') for c in have.split(sep)]
                    for col in columns:
                        if col not in names:
                            raise _missing(path, col, names) from None
                raise DataError(str(path), f"cannot parse ({msg})") from None
            first_line = 2
    for col in columns:
        if col not in table.column_names:
            raise _missing(path, col, table.column_names)
    return table.select(columns), first_line


def _json_slow(path: Path, raw: bytes) -> pa.Table:
    """JSON lines whose fields change type between lines: every value as text."""
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(str(path), f"not a JSON object ({exc.msg})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(str(path), "not a JSON object", line=lineno)
        rows.append(obj)
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({n: pa.array([None if r.get(n) is None else str(r[n]) for r in rows],
                                 pa.string()) for n in names})


def _where(first_line: int, row: int) -> dict[str, Any]:
    return {"line": first_line + row} if first_line else {}


def _ids(path: Path, arr: pa.ChunkedArray, column: str, first_line: int) -> np.ndarray:
    """Item ids: int64 when every id is an integer, else text; empty or repeated ids refused."""
    arr = arr.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        values = [None if v is None or not v.strip() else v.strip() for v in arr.to_pylist()]
    else:
        values = arr.to_pylist()
    for row, v in enumerate(values):
        if v is None:
            where = _where(first_line, row) or {}
            msg = "empty item id" + ("" if where else f" (row {row + 1})")
            raise DataError(str(path), msg, field=column, **where)
    try:
        ids = np.asarray([int(v) for v in values], dtype=np.int64)
        if any(isinstance(v, float) and v != int(v) for v in values):
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        ids = np.asarray([str(v) for v in values], dtype=object)
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = ids[first[counts > 1][0]]
        dup = dup.item() if isinstance(dup, np.generic) else dup
        rows = np.flatnonzero(ids == dup)
        second = int(rows[1])
        where = _where(first_line, second)
        what = (f"lines {first_line + int(rows[0])} and {first_line + second}" if first_line
                else f"rows {int(rows[0]) + 1} and {second + 1}")
        raise DataError(str(path), f"duplicate item id {dup!r} ({what}): each item once",
                        field=column, **where)
    return ids


def read_item_texts(path: str | Path, id_column: str, text_columns: list[str],
                    delimiter: str | None = None) -> tuple[np.ndarray, list[str]]:
    """(raw item ids, one text per item: its text columns joined by spaces)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such item file")
    if not text_columns:
        raise DataError(str(path), "no text columns given (--text-columns title,genres)")
    table, first_line = _read_table(path, [id_column, *text_columns], delimiter)
    if table.num_rows == 0:
        raise DataError(str(path), "the file holds no items")
    ids = _ids(path, table.column(id_column), id_column, first_line)
    parts = [
        ["" if v is None else str(v) for v in table.column(c).to_pylist()] for c in text_columns
    ]
    texts = [" ".join(p for p in row if p).replace("|", " ") for row in zip(*parts)]
    return ids, texts


def embed_texts(texts: list[str], dim: int, seed: int, where: str, fields: str,
                log: Callable[[str], None] = print) -> tuple[np.ndarray, dict[str, Any]]:
    """TF-IDF (sublinear term frequency, words of the text lowercased) then a truncated SVD to
    ``dim`` components (fewer when the vocabulary or the items are fewer: one line says so), rows
    L2-normalised. Offline and deterministic for ``seed``. Returns (float32 [N, dim'], how)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    vectorizer = TfidfVectorizer(sublinear_tf=True, lowercase=True, dtype=np.float64)
    try:
        tfidf = vectorizer.fit_transform(texts)
    except ValueError:  # "empty vocabulary"
        raise DataError(where, "no words in the text columns", field=fields) from None
    vocab = tfidf.shape[1]
    k = min(dim, vocab - 1, len(texts) - 1)
    if k < 1:
        dense = tfidf.toarray()
        log(f"[sid] a vocabulary of {vocab} word(s): the TF-IDF vectors are used as they are")
        k = vocab
    else:
        if k < dim:
            log(f"[sid] --dim {dim}: {k} SVD components (the items or the vocabulary of "
                f"{vocab} words allow no more)")
        svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed)
        dense = svd.fit_transform(tfidf)
    vectors = normalize(dense).astype(np.float32)
    return vectors, {"embedding": "tfidf+svd", "vocabulary": int(vocab), "svd_components": int(k)}


def read_vectors(path: str | Path, ids_path: str | Path | None = None,
                 id_column: str | None = None, vector_column: str = "vector",
                 log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """(raw item ids, float32 vectors [N, D]) of a ``.npy`` matrix (ids from ``ids_path``: a
    ``.npy`` or a text file of one id a line; none: the row numbers) or a parquet file with an
    id column and a list-of-floats vector column (``id_column`` None: ``raw_item_id`` when the
    file has it, as an artifact's item_embeddings.parquet, else ``item_id``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such vectors file")
    name = path.name.lower()
    if name.endswith(".npy"):
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(str(path), f"not a readable .npy array ({exc})") from None
        if vectors.ndim != 2 or vectors.dtype.kind not in "fiu":
            raise DataError(str(path), f"expected a 2-d array of numbers [items, dim], got "
                            f"{vectors.dtype} {list(vectors.shape)}")
        if ids_path is None:
            log(f"[sid] no --ids file: the item ids are the row numbers 0..{len(vectors) - 1}")
            ids = np.arange(len(vectors), dtype=np.int64)
        else:
            ids = _read_id_file(Path(ids_path))
            if len(ids) != len(vectors):
                raise DataError(str(ids_path), f"{len(ids)} ids for the {len(vectors)} rows of "
                                f"{path}")
            ids = _ids(Path(ids_path), pa.chunked_array([pa.array(ids)]), "ids",
                       0 if str(ids_path).endswith(".npy") else 1)
    elif name.endswith(".parquet"):
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(str(path), f"truncated or corrupt parquet file ({exc})") from None
        if id_column is None:
            id_column = "raw_item_id" if "raw_item_id" in schema.names else "item_id"
        for col in (id_column, vector_column):
            if col not in schema.names:
                raise _missing(path, col, schema.names)
        table = pq.read_table(path, columns=[id_column, vector_column])
        ids = _ids(path, table.column(id_column), id_column, 0)
        vec = table.column(vector_column).combine_chunks()
        if not (pa.types.is_list(vec.type) or pa.types.is_fixed_size_list(vec.type)
                or pa.types.is_large_list(vec.type)) or not (
                pa.types.is_floating(vec.type.value_type)
                or pa.types.is_integer(vec.type.value_type)):
            raise DataError(str(path), f"expected a list of numbers per item, got {vec.type}",
                            field=vector_column)
        if vec.null_count:
            raise DataError(str(path), "empty vector", field=vector_column)
        lengths = np.asarray(vec.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(str(path), f"row {row + 1} has {lengths[row]} numbers, row 1 has "
                            f"{lengths[0]}", field=vector_column)
        dim = int(lengths[0]) if len(lengths) else 0
        vectors = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    else:
        raise DataError(str(path), "unknown format: a .npy matrix (with --ids) or a .parquet "
                        "file with an id and a vector column")
    if len(vectors) == 0:
        raise DataError(str(path), "the file holds no vectors")
    vectors = vectors.astype(np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        item = ids[row].item() if isinstance(ids[row], np.generic) else ids[row]
        raise DataError(str(path), f"row {row + 1} (item {item!r}) has a NaN or an infinity",
                        field=vector_column if name.endswith(".parquet") else None)
    return ids, vectors


def _read_id_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(str(path), "no such ids file")
    if path.name.lower().endswith(".npy"):
        try:
            ids = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(str(path), f"not a readable .npy array ({exc})") from None
        if ids.ndim != 1:
            raise DataError(str(path), f"expected a 1-d array of ids, got {list(ids.shape)}")
        return ids if ids.dtype.kind in "iu" else ids.astype(str)
    lines = path.read_text("utf-8", "replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return np.asarray([ln.strip() for ln in lines], dtype=object)


__all__ = ["embed_texts", "read_item_texts", "read_vectors"]
