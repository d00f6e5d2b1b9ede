#!/usr/bin/env python
"""Step time with the weight average (TrainerArgs.ema_decay) against without, on one large
row-wise sharded table (prints figures; not a test).

    .venv/bin/python scripts/bench_ema.py                  # 1M rows x 64, 4096 ids a step
    .venv/bin/python scripts/bench_ema.py --rows 200000 --rounds 5

One process (gloo), FBGEMM's fused row-wise Adagrad. A step is a lookup of ``--ids`` random
ids, a backward (the fused update of the looked-up rows) and, in the averaged runs, the
average's update. Modes run alternately in rounds of ``--steps`` steps, so that the other
work on the host disturbs them alike: "none" (no average), "lazy" (the average as the
trainer keeps it: rows caught up when looked up and when read) and, with ``--eager``, the
whole-table update every step (what the trainer did before). Reported per mode: median
process CPU time and wall time of a step over the rounds, and the ratio to "none".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ids", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="also time the whole-table update")
    args = parser.parse_args()

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from hstu.args import EmbeddingArgs, OptimizerArgs
    from hstu.embeddings import build_embedding_collection, embedding_state_dict, shard_embeddings
    from hstu.training.ema import WeightAverage

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    tables = [EmbeddingArgs(feature_names=["item"], table_name="item",
                            item_vocab_size_or_capacity=args.rows, sharding_type="model_parallel")]
    opt = OptimizerArgs(optimizer_str="sgd", learning_rate=0.1, sparse_optimizer_str="rowwise_adagrad")
    emb = build_embedding_collection(tables, {"item": args.dim}, "cpu", seed=0,
                                     sparse_optimizer="rowwise_adagrad")
    emb, _ = shard_embeddings(emb, tables, opt, "cpu", sharding_overrides={"item": "row_wise"})
    emb.train()
    state = embedding_state_dict(emb)
    averages = {"none": None, "lazy": WeightAverage({}, state, None, 0.999, model=emb)}
    if args.eager:
        averages["eager"] = WeightAverage({}, state, None, 0.999)
    g = torch.Generator().manual_seed(0)
    upstream = torch.randn(args.dim, generator=g)

    def step(ema: WeightAverage | None) -> None:
        ids = torch.randint(0, args.rows, (args.ids,), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item"], values=ids, lengths=torch.full((args.ids // 8,), 8, dtype=torch.int64))
        out = emb(kjt)["item"].values()
        (out * upstream).sum().backward()
        if ema is not None:
            ema.update()

    for name, ema in averages.items():  # warm-up (allocations, first-call paths)
        step(ema)
    cpu: dict[str, list[float]] = {k: [] for k in averages}
    wall: dict[str, list[float]] = {k: [] for k in averages}
    for r in range(args.rounds):
        order = list(averages) if r % 2 == 0 else list(reversed(averages))
        for name in order:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(args.steps):
                step(averages[name])
            cpu[name].append((time.process_time() - c0) / args.steps)
            wall[name].append((time.perf_counter() - w0) / args.steps)
    # a read at the end (what an evaluation does): the lazy average caught up whole
    c0 = time.perf_counter()
    with averages["lazy"].swapped():
        pass
    read = time.perf_counter() - c0
    base_cpu, base_wall = statistics.median(cpu["none"]), statistics.median(wall["none"])
    print(f"table {args.rows} x {args.dim} (row_wise, fused rowwise Adagrad), {args.ids} ids "
          f"a step, {args.rounds} rounds x {args.steps} steps, alternating; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'mode':8s} {'cpu ms/step':>12s} {'wall ms/step':>13s} {'cpu ratio':>10s} {'wall ratio':>11s}")
    for name in averages:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:8s} {c * 1e3:12.2f} {w * 1e3:13.2f} {c / base_cpu:10.3f} {w / base_wall:11.3f}")
    print(f"lazy average read whole (catch-up + swap in + swap out): {read * 1e3:.0f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
