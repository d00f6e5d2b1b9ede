"""A content nearest-neighbour baseline for retrieval, on the trainer's protocol: each query
scores every item by the cosine between the item's text vector and the mean of its history's
(the same TF-IDF + SVD vectors ``python -m hstu.sid.tokenize --items`` clusters), history
excluded; HR@K, NDCG@K and MRR over every test target and over the cold ones
(``DatasetArgs.cold_items``, docs/data.md "Cold items"). It never trains, so a cold item is
as reachable as any other: the yardstick of the semantic-id model's cold-item figures.

    python scripts/content_knn.py --dataset tmp_data/ml-100k --items PATH/ml-100k/u.item \\
        --text-columns title,release_date,genres --cold-items 0.1 --holdout-validation

Prints one line of metrics per target set; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def item_vectors(items_path: str, text_columns: list[str], id_column: str, dim: int, seed: int,
                 raw_of_dense: dict[int, object] | None, num_items: int) -> torch.Tensor:
    """float32 [num_items, d]: row i the text vector of dense item id i (zeros for ids without
    one: padding, or items missing from the file)."""
    from hstu.sid import inputs

    raw_ids, texts = inputs.read_item_texts(items_path, id_column, text_columns)
    vectors, _ = inputs.embed_texts(texts, dim, seed, items_path, ",".join(text_columns),
                                    log=lambda _line: None)
    at = {str(r): i for i, r in enumerate(raw_ids.tolist())}
    out = np.zeros((num_items, vectors.shape[1]), np.float32)
    for dense in range(num_items):
        raw = dense if raw_of_dense is None else raw_of_dense.get(dense)
        row = None if raw is None else at.get(str(raw))
        if row is not None:
            out[dense] = vectors[row]
    return torch.from_numpy(out)


def evaluate(vectors: torch.Tensor, histories: list[np.ndarray], targets: np.ndarray,
             first_item_id: int) -> torch.Tensor:
    """1-based target ranks [Q] (float) of the content scores, history excluded, ties counted
    in the target's favour; ids below ``first_item_id`` never ranked."""
    ranks = torch.empty(len(targets))
    for start in range(0, len(targets), 256):
        chunk = range(start, min(start + 256, len(targets)))
        queries = torch.stack([vectors[torch.from_numpy(histories[q])].mean(0) for q in chunk])
        scores = torch.nn.functional.normalize(queries, dim=1) @ vectors.t()
        scores[:, :first_item_id] = float("-inf")
        for row, q in enumerate(chunk):
            scores[row, torch.from_numpy(histories[q])] = float("-inf")
        target = torch.from_numpy(targets[list(chunk)])
        own = scores.gather(1, target.view(-1, 1))
        ranks[list(chunk)] = (scores > own).sum(1).float() + 1
    return ranks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/content_knn.py", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--dataset", required=True, help="a preprocessed dataset folder")
    ap.add_argument("--items", required=True, help="the item file (as hstu.sid.tokenize)")
    ap.add_argument("--text-columns", default="title,genres")
    ap.add_argument("--id-column", default="item_id")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-sequence-length", type=int, default=200)
    ap.add_argument("--cold-items", type=float, default=0.0)
    ap.add_argument("--cold-items-seed", type=int, default=0)
    ap.add_argument("--holdout-validation", action="store_true")
    ap.add_argument("--metrics", default="HR@10,NDCG@10,HR@50,MRR")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import pyarrow.parquet as pq

    from hstu.args import DatasetArgs
    from hstu.data import build_data
    from hstu.model import retrieval_metrics

    folder = Path(a.dataset)
    args = DatasetArgs(dataset_name=folder.name, dataset_path=str(folder),
                       max_sequence_length=a.max_sequence_length,
                       holdout_validation=a.holdout_validation, cold_items=a.cold_items,
                       cold_items_seed=a.cold_items_seed)
    _, test, info = build_data(args, "retrieval", 256, 256, 0, 1, 0, split="test",
                               holdout_validation=a.holdout_validation)
    raw_of_dense = None
    if (folder / "item_map.parquet").is_file():
        m = pq.read_table(folder / "item_map.parquet")
        raw_of_dense = dict(zip(m.column("item_id").to_pylist(),
                                m.column("raw_item_id").to_pylist()))
    vectors = item_vectors(a.items, [c for c in a.text_columns.split(",") if c], a.id_column,
                           a.dim, a.seed, raw_of_dense, info.num_items)
    s, store = test.samples, test.store
    histories = [np.asarray(store.items[b:e], dtype=np.int64)
                 for b, e in zip(s.hist_start, s.hist_end)]
    targets = np.asarray(store.items[s.target], dtype=np.int64)
    names = a.metrics.split(",")
    ranks = evaluate(vectors, histories, targets, info.first_item_id)
    out = {}
    sets = {"all": np.ones(len(targets), bool)}
    if test.cold_items is not None:
        sets["cold"] = np.isin(targets, test.cold_items)
    for name, keep in sets.items():
        m = retrieval_metrics(ranks[torch.from_numpy(keep)], names)
        out[name] = {k: float(v.mean()) for k, v in m.items()}
        out[name]["events"] = int(keep.sum())
        print(f"content kNN, {name} test targets ({int(keep.sum())}): " + " ".join(
            f"{k} {v:.4f}" for k, v in out[name].items() if k != "events"), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
