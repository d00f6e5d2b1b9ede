r"""Item vectors -> semantic ids (codes): residual k-means, written as a codes file.

    python -m hstu.sid.tokenize --items items.csv --id-column item_id \
        --text-columns title,genres --levels 3 --codes 256 --seed 1 --out sid/
    python -m hstu.sid.tokenize --vectors vectors.npy --ids ids.txt --out sid/
    python -m hstu.sid.tokenize --vectors artifact/item_embeddings.parquet --out sid/
    python -m hstu.sid.tokenize --ckpt runs/retrieval-.../ckpt --out sid/

Writes ``<out>/sid_codes.parquet`` (raw item id -> L + 1 codes, the configuration in its
metadata) and ``<out>/sid_centroids.npz``, and prints code usage, collisions and the
quantization error per level (docs/semantic_ids.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from hstu.data.errors import DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hstu.sid.tokenize",
        description="Item vectors -> semantic ids: L levels of residual k-means with K codes "
                    "each, plus a last level that makes every item's code sequence unique.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--items", metavar="FILE",
                     help="item file (CSV/TSV/TXT with a header, JSON lines or parquet, "
                          "optionally .gz; or MovieLens-100K's u.item): its text columns are "
                          "embedded by TF-IDF + truncated SVD")
    src.add_argument("--vectors", metavar="FILE",
                     help="item vectors: a .npy matrix [items, dim] (ids from --ids), or a "
                          "parquet file with an id column and a vector column (an artifact's "
                          "item_embeddings.parquet reads as it is)")
    src.add_argument("--ckpt", metavar="DIR",
                     help="a trained checkpoint (folder, or a save root): its item table's "
                          "rows are the vectors (collaborative codes)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write sid_codes.parquet and sid_centroids.npz into")
    parser.add_argument("--id-column", default=None,
                        help="item id column (--items default item_id; --vectors parquet "
                             "default: raw_item_id when present, else item_id)")
    parser.add_argument("--text-columns", default="title,genres",
                        help="--items: comma-separated text columns (default title,genres)")
    parser.add_argument("--delimiter", default=None,
                        help="--items CSV/TXT: field separator (default , and tab for .tsv)")
    parser.add_argument("--dim", type=int, default=64,
                        help="--items: SVD components of the TF-IDF vectors (default 64)")
    parser.add_argument("--ids", default=None, metavar="FILE",
                        help="--vectors .npy: the ids of its rows (.npy, or text with one id a "
                             "line); default the row numbers")
    parser.add_argument("--vector-column", default="vector",
                        help="--vectors parquet: the vector column (default vector)")
    parser.add_argument("--l2-normalize", action="store_true",
                        help="--vectors/--ckpt: scale each vector to unit length before k-means "
                             "(codes in the geometry of a model that scores by cosine, as the "
                             "retrieval presets do; --items vectors are unit length already)")
    parser.add_argument("--levels", type=int, default=3, help="k-means levels L (default 3)")
    parser.add_argument("--codes", type=int, default=256,
                        help="codes per level K (default 256); at most the number of items")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--n-init", type=int, default=1,
                        help="k-means restarts per level, the best kept (default 1)")
    parser.add_argument("--max-iter", type=int, default=300,
                        help="k-means iterations per level at most (default 300)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP threads (default 1: the same codes bit for bit on "
                             "every run; more may move items near a boundary)")
    ns = parser.parse_args(argv)
    for name in ("levels", "codes", "dim", "n_init", "max_iter", "threads"):
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    if ns.ids and not ns.vectors:
        parser.error("--ids is for --vectors FILE.npy")
    if ns.l2_normalize and ns.items:
        parser.error("--l2-normalize is for --vectors or --ckpt (--items vectors are unit "
                     "length already)")
    return ns


def run(ns: argparse.Namespace, log: Any = print) -> Any:
    """Reads the input named by ``ns``, fits the codes, writes them; returns the SidCodes."""
    from hstu.data.semantic_ids import describe_stats, save_codes, tokenize
    from hstu.sid import inputs

    start = time.perf_counter()
    if ns.items:
        id_column = ns.id_column or "item_id"
        columns = [c.strip() for c in ns.text_columns.split(",") if c.strip()]
        ids, texts = inputs.read_item_texts(ns.items, id_column, columns, ns.delimiter)
        vectors, how = inputs.embed_texts(texts, ns.dim, ns.seed, ns.items, ",".join(columns),
                                          log)
        source: dict[str, Any] = {"kind": "items", "path": ns.items, "id_column": id_column,
                                  "text_columns": columns, **how}
        where, what = ns.items, f"TF-IDF + SVD of {','.join(columns)}"
    elif ns.vectors:
        ids, vectors = inputs.read_vectors(ns.vectors, ns.ids, ns.id_column, ns.vector_column,
                                           log)
        source = {"kind": "vectors", "path": ns.vectors, "ids": ns.ids}
        where, what = ns.vectors, "item vectors"
    else:
        from hstu.export import checkpoint_item_vectors

        ids, vectors, ckpt_dir = checkpoint_item_vectors(ns.ckpt, log)
        if len(ids) == 0:
            raise DataError(ns.ckpt, "the checkpoint's item table holds no items")
        source = {"kind": "checkpoint", "path": str(ckpt_dir)}
        where, what = str(ckpt_dir), "the checkpoint's item table"
    if ns.l2_normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if not np.all(norms > 0):
            raise DataError(where, f"{int(np.sum(norms == 0))} item vectors are all zeros: "
                            "they have no direction to normalise", field="--l2-normalize")
        vectors = (vectors / norms).astype(np.float32)
        source["l2_normalized"] = True
        what += ", scaled to unit length"
    if ns.codes > len(ids):
        raise DataError(where, f"{ns.codes} codes per level but only {len(ids)} items: pass "
                        f"--codes {len(ids)} or fewer", field="--codes")
    log(f"[sid] {len(ids)} items from {where}: {what}, vectors of dim {vectors.shape[1]}; "
        f"{ns.levels} levels x {ns.codes} codes, seed {ns.seed}")
    try:
        sid = tokenize(ids, vectors, ns.levels, ns.codes, ns.seed, ns.n_init, ns.max_iter,
                       ns.threads, source, log)
    except ValueError as exc:
        raise DataError(where, str(exc)) from None
    for line in describe_stats(sid.config["stats"], len(ids)):
        log(line)
    try:
        path = save_codes(sid, ns.out)
    except OSError as exc:
        raise DataError(ns.out, f"cannot write the codes ({exc.strerror or exc})") from None
    log(f"[sid] wrote {path} ({ns.levels} + 1 codes per item) in "
        f"{time.perf_counter() - start:.1f}s")
    return sid


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    from hstu.console import fail, quiet_start

    if ns.ckpt:
        quiet_start()  # known harmless third-party warnings of a checkpoint load stay off

    from hstu.args import ConfigError
    from hstu.export import ExportError
    from hstu.training.checkpoint import CheckpointError

    try:
        run(ns)
    except ExportError as exc:  # --ckpt: as python -m hstu.export says it
        return fail(str(exc), exc.code)
    except (ConfigError, DataError) as exc:
        return fail(str(exc), 2)
    except CheckpointError as exc:  # --ckpt: damaged, missing or no complete checkpoint
        return fail(str(exc), 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
