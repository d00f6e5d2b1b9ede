"""Semantic ids: residual k-means from item vectors to codes, the codes file and its loader
(docs/semantic_ids.md; the command is ``python -m hstu.sid.tokenize``).

An item's semantic id is ``L + 1`` codes: level ``l < L`` is the nearest of ``K`` centroids
fitted by k-means (scikit-learn) on what the levels before it left unexplained (the residual
``x - c_1 - ... - c_l``); the last level is a collision index that makes every item's code
sequence unique: the items that share their first ``L`` codes get ``0, 1, 2, ...`` ordered by
their distance to the reconstruction (the sum of their centroids; nearest first), then by their
raw item id.

Deterministic for a seed: each level's k-means has a fixed ``n_init`` and ``random_state``
(``seed + level``), and runs with one BLAS/OpenMP thread by default (scikit-learn's Lloyd
iteration adds per-thread partial sums in the order the threads finish, so more threads may
move a centroid in its last bits and an item near a boundary to the other code).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hstu.data.errors import DataError

FORMAT_VERSION = 1
CODES_FILE = "sid_codes.parquet"
CENTROIDS_FILE = "sid_centroids.npz"
METADATA_KEY = b"hstu.sid"
REQUIRED_CONFIG = ("format", "levels", "codes", "seed", "source", "dim", "n_items")


@dataclass
class SidCodes:
    """Items and their codes: ``codes[i]`` is the ``L + 1`` codes of raw id ``item_ids[i]``."""

    item_ids: np.ndarray
    """Raw item ids: int64, or an object array of str."""
    codes: np.ndarray
    """int32 [N, L + 1]: L levels in [0, K), then the collision index."""
    config: dict[str, Any]
    """levels, codes (K), seed, source, dim, n_items, level_codes (codes fitted per level),
    n_init, max_iter, stats (:func:`code_stats`)."""
    centroids: list[np.ndarray] = field(default_factory=list)
    """float32 [K_l, dim] per level (empty when loaded without the centroids file)."""

    @property
    def levels(self) -> int:
        return int(self.config["levels"])


# ------------------------------------------------------------------------------ fitting


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 [N], centers float32 [k, D]) of scikit-learn's KMeans (Lloyd)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed,
                algorithm="lloyd")
    labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float32)


def _distinct_rows(x: np.ndarray) -> int:
    return len(np.unique(x, axis=0))


def residual_kmeans(
    vectors: np.ndarray, levels: int, codes: int, seed: int, n_init: int = 1,
    max_iter: int = 300, log: Callable[[str], None] = print,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Codes of ``L = levels`` levels of at most ``K = codes`` centroids each.

    A level whose residuals have fewer than K distinct vectors (many identical items, or items
    already fully explained) fits only that many centroids (one line says so): k-means cannot
    place more distinct centroids than there are distinct points.

    Returns: (codes int32 [N, L], centroids float32 [K_l, D] per level, residual float32 [N, D]
    after the last level).
    """
    residual = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    n = len(residual)
    out = np.zeros((n, levels), dtype=np.int32)
    centroids = []
    for level in range(levels):
        distinct = _distinct_rows(residual)
        k = min(codes, distinct)
        if k < codes:
            log(f"[sid] level {level + 1}: the residuals hold {distinct} distinct vectors, "
                f"fewer than the {codes} codes: {k} fitted")
        labels, centers = _kmeans(residual, k, seed + level, n_init, max_iter)
        out[:, level] = labels
        residual -= centers[labels]
        centroids.append(centers)
    return out, centroids, residual


def collision_index(prefix: np.ndarray, residual: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """The last level: items sharing their ``prefix`` codes numbered 0, 1, ... by the distance
    to their reconstruction (``|residual|``, nearest first), then by raw item id. int32 [N]."""
    n = len(prefix)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    _, group = np.unique(prefix, axis=0, return_inverse=True)
    group = group.reshape(-1)
    _, id_rank = np.unique(item_ids, return_inverse=True)  # ids are unique: their sort order
    dist = np.einsum("ij,ij->i", residual, residual, dtype=np.float64)
    order = np.lexsort((id_rank.reshape(-1), dist, group))  # by group, then dist, then id
    sorted_group = group[order]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    out = np.empty(n, dtype=np.int32)
    out[order] = np.arange(n) - first
    return out


def _perplexity(labels: np.ndarray) -> float:
    counts = np.bincount(labels)
    p = counts[counts > 0] / len(labels)
    return float(math.exp(-(p * np.log(p)).sum()))


def code_stats(vectors: np.ndarray, codes: np.ndarray, centroids: list[np.ndarray],
               k: int) -> dict[str, Any]:
    """Per level: codes used (of K), perplexity (exp of the codes' entropy; K when all are used
    equally) and the quantization error after the level (mean squared residual, and its share
    of the vectors' variance around their mean); collisions of the first L codes."""
    x = np.asarray(vectors, dtype=np.float64)
    variance = float(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()) if len(x) else 0.0
    residual = x.copy()
    levels = []
    for level, centers in enumerate(centroids):
        labels = codes[:, level]
        residual -= centers.astype(np.float64)[labels]
        mse = float((residual ** 2).sum(axis=1).mean())
        levels.append({
            "level": level + 1,
            "codes_fitted": len(centers),
            "codes_used": len(np.unique(labels)),
            "perplexity": round(_perplexity(labels), 3),
            "mse": mse,
            "variance_left": mse / variance if variance > 0 else 0.0,
        })
    num_levels = len(centroids)
    _, counts = np.unique(codes[:, :num_levels], axis=0, return_counts=True)
    shared = counts[counts > 1]
    return {
        "codes": k,
        "variance": variance,
        "levels": levels,
        "unique_prefixes": len(counts),
        "colliding_items": int(shared.sum()),
        "collision_groups": len(shared),
        "largest_group": int(counts.max()) if len(counts) else 0,
        "last_level_max": int(codes[:, -1].max()) if len(codes) else 0,
    }


def describe_stats(stats: dict[str, Any], n_items: int) -> list[str]:
    """The printed lines of :func:`code_stats`."""
    k = stats["codes"]
    lines = []
    for s in stats["levels"]:
        lines.append(
            f"[sid] level {s['level']}: {s['codes_used']}/{k} codes used, perplexity "
            f"{s['perplexity']:.1f}, quantization error {s['mse']:.4g} "
            f"({100 * s['variance_left']:.1f}% of the variance left)"
        )
    lines.append(
        f"[sid] collisions: {stats['colliding_items']} of {n_items} items share their first "
        f"{len(stats['levels'])} codes with another ({stats['collision_groups']} groups, "
        f"{stats['unique_prefixes']} distinct prefixes); largest group {stats['largest_group']}, "
        f"last level max {stats['last_level_max']}"
    )
    return lines


def tokenize(
    item_ids: np.ndarray, vectors: np.ndarray, levels: int = 3, codes: int = 256, seed: int = 1,
    n_init: int = 1, max_iter: int = 300, threads: int | None = 1,
    source: dict[str, Any] | None = None, log: Callable[[str], None] = print,
) -> SidCodes:
    """Item vectors [N, D] -> :class:`SidCodes` (L residual k-means levels + a collision level).

    ``threads``: BLAS/OpenMP threads while fitting (1: bitwise the same codes on every run;
    None: the library's default). Refuses (ValueError) K larger than the number of items, fewer
    than one level or code, non-finite vectors, and duplicate ids.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) != len(item_ids):
        raise ValueError(f"vectors must be [N, D] with N = {len(item_ids)} ids, got "
                         f"{vectors.shape}")
    if levels < 1 or codes < 1:
        raise ValueError(f"levels and codes must be >= 1, got {levels} and {codes}")
    if codes > len(item_ids):
        raise ValueError(f"--codes {codes} is more than the {len(item_ids)} items: pass "
                         f"--codes {len(item_ids)} or fewer")
    if not np.isfinite(vectors).all():
        row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise ValueError(f"item {_plain(item_ids[row])!r}: its vector has a NaN or an infinity")
    if len(np.unique(item_ids)) != len(item_ids):
        raise ValueError("duplicate item ids")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        prefix, centroids, residual = residual_kmeans(vectors, levels, codes, seed, n_init,
                                                      max_iter, log)
    last = collision_index(prefix, residual, item_ids)
    all_codes = np.concatenate([prefix, last[:, None]], axis=1).astype(np.int32)
    stats = code_stats(vectors, all_codes, centroids, codes)
    config = {
        "format": FORMAT_VERSION, "levels": levels, "codes": codes, "seed": seed,
        "n_init": n_init, "max_iter": max_iter,
        "level_codes": [len(c) for c in centroids],
        "collision_codes": int(all_codes[:, -1].max()) + 1 if len(all_codes) else 0,
        "source": source or {"kind": "vectors"}, "dim": int(vectors.shape[1]),
        "n_items": len(item_ids), "stats": stats,
    }
    return SidCodes(np.asarray(item_ids), all_codes, config, centroids)


# ------------------------------------------------------------------------------ the file


def save_codes(sid: SidCodes, out: str | Path) -> Path:
    """Writes ``out/sid_codes.parquet`` (item_id, codes: L + 1 int32; the config as JSON in the
    schema metadata under ``hstu.sid``) and ``out/sid_centroids.npz`` (level_1 .. level_L).
    Returns the codes file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = sid.item_ids
    id_array = (pa.array(ids.astype(np.int64)) if ids.dtype.kind in "iu"
                else pa.array([str(v) for v in ids], pa.string()))
    width = sid.codes.shape[1]
    codes = pa.FixedSizeListArray.from_arrays(pa.array(sid.codes.reshape(-1), pa.int32()), width)
    table = pa.table({"item_id": id_array, "codes": codes})
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(sid.config).encode()})
    path = out / CODES_FILE
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    np.savez(out / CENTROIDS_FILE,
             **{f"level_{i + 1}": c.astype(np.float32) for i, c in enumerate(sid.centroids)})
    return path


def _plain(v: Any) -> Any:
    """A numpy scalar as the Python value (its repr in messages: 1, not np.int64(1))."""
    return v.item() if isinstance(v, np.generic) else v


def _bad(path: Path, message: str, field_name: str) -> DataError:
    return DataError(str(path), message, field=field_name)


def _check_config(path: Path, config: Any) -> None:
    key = METADATA_KEY.decode()
    if not isinstance(config, dict):
        raise _bad(path, "the metadata is not a JSON object", key)
    for name in REQUIRED_CONFIG:
        if name not in config:
            raise _bad(path, "missing in the codes file's config", f"{key}.{name}")
    if config["format"] != FORMAT_VERSION:
        raise _bad(path, f"format {config['format']!r}, this version reads {FORMAT_VERSION}",
                   f"{key}.format")
    for name in ("levels", "codes", "dim", "n_items"):
        v = config[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _bad(path, f"expected a positive integer, got {v!r}", f"{key}.{name}")
    if not isinstance(config["seed"], int):
        raise _bad(path, f"expected an integer, got {config['seed']!r}", f"{key}.seed")


def load_codes(path: str | Path, centroids: bool = True) -> SidCodes:
    """Reads and validates a codes file (or the folder holding ``sid_codes.parquet``). Every
    problem is one :class:`hstu.data.errors.DataError` line naming the file and the field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        path = path / CODES_FILE
    if not path.is_file():
        raise DataError(str(path), "no such codes file (write one with python -m "
                                   "hstu.sid.tokenize)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"not a readable parquet file ({exc})") from None
    key = METADATA_KEY.decode()
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise _bad(path, "no config in the schema metadata: not a codes file of "
                         "python -m hstu.sid.tokenize", key)
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise _bad(path, f"the config is not JSON ({exc})", key) from None
    _check_config(path, config)
    levels, k = config["levels"], config["codes"]
    for col in ("item_id", "codes"):
        if col not in table.column_names:
            raise _bad(path, f"missing column (the file has {', '.join(table.column_names)})", col)
        if table.column(col).null_count:
            raise _bad(path, "empty value", col)
    if table.num_rows != config["n_items"]:
        raise _bad(path, f"{table.num_rows} rows, the config says {config['n_items']}",
                   f"{key}.n_items")
    ids_col = table.column("item_id").combine_chunks()
    if pa.types.is_integer(ids_col.type):
        ids = ids_col.to_numpy().astype(np.int64)
    elif pa.types.is_string(ids_col.type) or pa.types.is_large_string(ids_col.type):
        ids = np.asarray(ids_col.to_pylist(), dtype=object)
    else:
        raise _bad(path, f"expected integers or strings, got {ids_col.type}", "item_id")
    codes_col = table.column("codes").combine_chunks()
    if not (pa.types.is_list(codes_col.type) or pa.types.is_fixed_size_list(codes_col.type)
            or pa.types.is_large_list(codes_col.type)):
        raise _bad(path, f"expected a list of L + 1 integers per item, got {codes_col.type}",
                   "codes")
    lengths = np.asarray(codes_col.value_lengths())
    if (lengths != levels + 1).any():
        row = int(np.flatnonzero(lengths != levels + 1)[0])
        raise _bad(path, f"row {row + 1} has {lengths[row]} codes, the config's levels + 1 is "
                         f"{levels + 1}", "codes")
    flat = codes_col.flatten()
    if not pa.types.is_integer(flat.type):
        raise _bad(path, f"expected integer codes, got {flat.type}", "codes")
    codes = flat.to_numpy().astype(np.int64).reshape(-1, levels + 1)
    upper = np.r_[np.full(levels, k), np.iinfo(np.int32).max]
    bad = (codes < 0) | (codes >= upper)
    if bad.any():
        row, level = (int(v) for v in np.argwhere(bad)[0])
        what = f"level {level + 1}" if level < levels else "the collision level"
        raise _bad(path, f"row {row + 1}: code {codes[row, level]} at {what} is outside "
                         f"[0, {k if level < levels else 'inf'})", "codes")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise _bad(path, f"item id {_plain(uniq[counts > 1][0])!r} appears "
                         f"{counts[counts > 1][0]} times",
                   "item_id")
    _, counts = np.unique(codes, axis=0, return_counts=True)
    if (counts > 1).any():
        raise _bad(path, f"{int((counts > 1).sum())} code sequences are shared by several items "
                         "(each item's codes must be unique)", "codes")
    cents: list[np.ndarray] = []
    cpath = path.with_name(CENTROIDS_FILE)
    if centroids and cpath.is_file():
        try:
            with np.load(cpath, allow_pickle=False) as z:
                cents = [z[f"level_{i + 1}"] for i in range(levels)]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(str(cpath), f"cannot read the centroids ({exc})") from None
        for i, c in enumerate(cents):
            if c.ndim != 2 or c.shape[1] != config["dim"] or len(c) > k:
                raise _bad(cpath, f"shape {c.shape}, expected [<= {k}, {config['dim']}]",
                           f"level_{i + 1}")
    return SidCodes(ids, codes.astype(np.int32), config, cents)


__all__ = [
    "CENTROIDS_FILE", "CODES_FILE", "SidCodes", "code_stats", "collision_index",
    "describe_stats", "load_codes", "residual_kmeans", "save_codes", "tokenize",
]
