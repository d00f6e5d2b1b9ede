"""Lookup + backward throughput (ids/s): static vs dynamic tables at 1M rows, and eviction cost.

    .venv/bin/python scripts/bench_embeddings.py [--rows 1000000] [--ids 65536] [--steps 20]

One process (gloo world of 1, TorchRec-sharded like training), fused row-wise Adagrad.
Three tables measured side by side in one run, same dim and batch:
  static    EmbeddingArgs, ids uniform in [0, rows)
  dynamic   DynamicEmbeddingArgs of the same capacity, raw 64-bit ids from a pool that
            fits the capacity (after warm-up: admissions only, no eviction)
  evicting  the same dynamic table fed ids from a pool 4x the capacity (evictions every step)
Prints ids/s and the ratios dynamic/static and evicting/dynamic.

    .venv/bin/python scripts/bench_embeddings.py --scale [--compare-with OLD_dynamic.py]

Scale mode (docs/performance.md "Scale"): a dynamic table of --rows capacity (default 1M),
batches of --ids ids (default 65,536; a multiple of 256) drawn Zipf(1.05) or uniform (--dist) from --distinct
ids (default 4.35M, KuaiRand-1K's videos), --steps steps (default 500). A step is the
remap + lookup + backward with the fused row-wise Adagrad update; the bookkeeping is the
remapper's forward (admission, eviction, index). Prints the bookkeeping share of the step
and the RSS at 10%, 50% and 100% of the steps. --compare-with times another
DynamicIdRemapper implementation (a copy of an older hstu/embeddings/dynamic.py) on the
same id stream, remapper only, interleaved step by step.
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
        out = emb.lookup(_kjt(ids, batch))["f"].values()
        out.sum().backward()
    return steps * ids.numel() / (time.perf_counter() - start)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _scale(args: argparse.Namespace, opt: OptimizerArgs) -> None:
    import importlib.util

    gen = torch.Generator().manual_seed(0)
    if args.dist == "zipf":
        ranks = torch.arange(1, args.distinct + 1, dtype=torch.float64)
        cdf = torch.cumsum(ranks.pow(-1.05), 0)
        cdf /= cdf[-1].clone()

        def draw() -> torch.Tensor:
            u = torch.rand(args.ids, generator=gen, dtype=torch.float64)
            return torch.searchsorted(cdf, u).clamp_(max=args.distinct - 1)
    else:

        def draw() -> torch.Tensor:
            return torch.randint(0, args.distinct, (args.ids,), generator=gen)

    perm_key = 0x5DEECE66D  # raw ids scattered over int64, a fixed bijection of the rank

    table = DynamicEmbeddingArgs(feature_names=["f"], table_name="t",
                                 item_vocab_size_or_capacity=args.distinct,
                                 item_vocab_gpu_capacity=args.rows, evict_strategy=args.policy)
    emb = build_embedding_collection([table], {"t": args.dim}, "cpu", seed=0,
                                     sparse_optimizer="rowwise_adagrad")
    emb, _ = shard_embeddings(emb, [table], opt, "cpu")
    emb.train()
    remapper = emb.remappers["t"]
    old = None
    if args.compare_with:
        spec = importlib.util.spec_from_file_location("old_dynamic", args.compare_with)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        old = mod.DynamicIdRemapper("t", args.rows, args.policy).train()
    t_step = t_book = t_old = 0.0
    evicted = 0
    rss = {}
    marks = {max(1, args.steps // 10), args.steps // 2, args.steps}
    for i in range(1, args.steps + 1):
        ids = draw() * 2654435761 + perm_key
        orig = remapper.forward
        times = []

        def timed(x, _orig=orig, _times=times):
            t = time.perf_counter()
            out = _orig(x)
            _times.append(time.perf_counter() - t)
            return out

        remapper.forward = timed
        t0 = time.perf_counter()
        out = emb.lookup(_kjt(ids, 256))["f"].values()
        out.sum().backward()
        dt = time.perf_counter() - t0
        remapper.forward = orig
        if old is not None:
            t1 = time.perf_counter()
            old(ids)
            t_old_i = time.perf_counter() - t1
        if i > args.warmup:
            t_step += dt
            t_book += sum(times)
            evicted += remapper._last_step_evicted
            if old is not None:
                t_old += t_old_i
        if i in marks:
            rss[i] = _rss_mib()
    n = args.steps - args.warmup
    s = emb.stats()["t"]
    print(f"capacity {args.rows}, distinct {args.distinct} ({args.dist}), {args.ids} ids/step, "
          f"dim {args.dim}, policy {args.policy}, {n} timed steps")
    print(f"step {t_step / n * 1e3:.1f} ms, bookkeeping {t_book / n * 1e3:.1f} ms "
          f"({t_book / t_step:.1%} of the step), evictions/step {evicted / n:.0f}, "
          f"occupancy {s['occupancy']:.1%}")
    if old is not None:
        print(f"compared remapper ({args.compare_with}): {t_old / n * 1e3:.1f} ms/step "
              f"({t_old / t_book:.1f}x this one)")
    print("RSS MiB at step " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(rss.items())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ids", type=int, default=65_536, help="ids per step")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--scale", action="store_true", help="the dynamic-table scale bench")
    parser.add_argument("--distinct", type=int, default=4_350_000)
    parser.add_argument("--dist", choices=["zipf", "uniform"], default="zipf")
    parser.add_argument("--policy", choices=["lru", "lfu"], default="lru")
    parser.add_argument("--compare-with", default="")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    opt = OptimizerArgs(optimizer_str="sgd", learning_rate=0.01, sparse_optimizer_str="rowwise_adagrad")
    if args.scale:
        _scale(args, opt)
        dist.destroy_process_group()
        return
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
