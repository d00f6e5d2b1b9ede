"""Lookup + backward throughput (ids/s): static vs dynamic tables at 1M rows, and eviction cost.

    .venv/bin/python scripts/bench_embeddings.py [--rows 1000000] [--ids 65536] [--steps 20]

One process (gloo world of 1, TorchRec-sharded like training), fused row-wise Adagrad.
Three tables measured side by side in one run, same dim and batch:
  static    EmbeddingArgs, ids uniform in [0, rows)
  dynamic   DynamicEmbeddingArgs of the same capacity, raw 64-bit ids from a pool that
            fits the capacity (after warm-up: admissions only, no eviction)
  evicting  the same dynamic table fed ids from a pool 4x the capacity (evictions every step)
Prints ids/s and the ratios dynamic/static and evicting/dynamic.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.args import DynamicEmbeddingArgs, EmbeddingArgs, OptimizerArgs
from hstu.embeddings import build_embedding_collection, shard_embeddings


def _kjt(ids: torch.Tensor, batch: int) -> KeyedJaggedTensor:
    lengths = torch.full((batch,), ids.numel() // batch, dtype=torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=lengths)


def _measure(emb, make_ids, batch: int, steps: int, warmup: int) -> float:
    emb.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        ids = make_ids(i)
        out = emb(_kjt(ids, batch))["f"].values()
        out.sum().backward()
    return steps * ids.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=65_536, help="ids per step")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    opt = OptimizerArgs(optimizer_str="sgd", learning_rate=0.01, sparse_optimizer_str="rowwise_adagrad")
    batch = 256
    gen = torch.Generator().manual_seed(0)
    rows = args.rows
    results = {}
    pool_fit = torch.randint(-(2**63), 2**63 - 1, (rows // 2,), generator=gen)
    pool_big = torch.randint(-(2**63), 2**63 - 1, (4 * rows,), generator=gen)

    def uniform(n: int):
        return lambda i: torch.randint(0, n, (args.ids,), generator=gen)

    def from_pool(pool: torch.Tensor):
        return lambda i: pool[torch.randint(0, pool.numel(), (args.ids,), generator=gen)]

    cases = {
        "static": (EmbeddingArgs(feature_names=["f"], table_name="t", item_vocab_size_or_capacity=rows,
                                 sharding_type="model_parallel"), uniform(rows)),
        "dynamic": (DynamicEmbeddingArgs(feature_names=["f"], table_name="t",
                                         item_vocab_size_or_capacity=rows), from_pool(pool_fit)),
        "evicting": (DynamicEmbeddingArgs(feature_names=["f"], table_name="t",
                                          item_vocab_size_or_capacity=rows), from_pool(pool_big)),
    }
    for name, (table, make_ids) in cases.items():
        emb = build_embedding_collection([table], {"t": args.dim}, "cpu", seed=0,
                                         sparse_optimizer="rowwise_adagrad")
        emb, _ = shard_embeddings(emb, [table], opt, "cpu")
        results[name] = _measure(emb, make_ids, batch, args.steps, args.warmup)
        extra = ""
        if emb.remappers:
            s = emb.stats()["t"]
            extra = f"  occupancy {s['occupancy']:.1%}, evicted {s['evicted_total']}"
        print(f"{name:>9}: {results[name] / 1e6:7.3f} M ids/s{extra}", flush=True)
    print(f"ratio dynamic/static   : {results['dynamic'] / results['static']:.3f}")
    print(f"ratio evicting/dynamic : {results['evicting'] / results['dynamic']:.3f}"
          "  (eviction overhead = 1 - ratio)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
