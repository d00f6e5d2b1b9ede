"""Full-corpus retrieval training on a large catalogue: step time, memory and what each step's
input carries, on every rank:

    torchrun --standalone --nproc_per_node 2 scripts/bench_full_corpus.py \\
        [--items 1000000] [--steps 12] [--gin-param NAME=VALUE ...]

Runs configs/benchmark_retrieval.gin (synthetic in-memory batches) with
``negative_sampling="full_corpus"``, the item table row-wise over the ranks with
``--items`` rows, and trains ``--steps`` steps (the first 2 not timed). Rank 0 prints, per
rank: the median step (wall and process CPU seconds, from one training forward to the next),
the peak resident memory after the build and after all steps but the last (the run's final
evaluation not counted), and the most item ids one
step's KeyedJaggedTensor carried into the sharded EmbeddingCollection (the batch's tokens;
with the catalogue in the batch it would hold every id). docs/performance.md, "Catalogue
scale", has figures.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "benchmark_retrieval.gin")


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000, help="rows of the item table")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--gin-param", action="append", default=[])
    args = parser.parse_args()

    import torch.distributed as dist

    from hstu.config import load_config
    from hstu.training.run import with_trainer

    run_dir = tempfile.mkdtemp(prefix="bench_full_corpus_")
    cfg = load_config(
        CONFIG,
        [
            f'TrainerArgs.run_dir="{run_dir}"',
            f"TrainerArgs.max_train_iters={args.steps}",
            f"TrainerArgs.eval_interval={args.steps + 1}",
            "TrainerArgs.log_interval=1000",
            "TrainerArgs.train_batch_size=8",
            "item/FeatureArgs.max_sequence_length=64",
            f"item/EmbeddingArgs.item_vocab_size_or_capacity={args.items}",
            'item/EmbeddingArgs.sharding_override="row_wise"',
            'RetrievalArgs.negative_sampling="full_corpus"',
            "RetrievalArgs.num_negatives=-1",
            'RetrievalArgs.full_corpus_matmul_dtype="float32"',
            *args.gin_param,
        ],
        task="retrieval", world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )

    def measure(trainer) -> None:
        built_peak = _peak_gib()
        model = trainer.model
        stamps: list[tuple[float, float]] = []
        peaks: list[float] = []
        item_ids: list[int] = []
        item = trainer.built.info.item_feature_name

        def on_forward(module, inputs) -> None:
            if module.training:
                stamps.append((time.perf_counter(), time.process_time()))
                peaks.append(_peak_gib())  # after the previous steps (not the final evaluation)

        def on_lookup(module, inputs) -> None:
            if model.training:
                kjt = inputs[0]
                item_ids.append(sum(int(kjt[k].values().numel()) for k in kjt.keys() if k.startswith(item)))  # noqa: SIM118

        model.register_forward_pre_hook(on_forward)
        model.sparse.ec.register_forward_pre_hook(on_lookup)
        dist.barrier()
        trainer.train()
        dist.barrier()
        stamps.append((time.perf_counter(), time.process_time()))
        timed = stamps[2:]
        wall = statistics.median(b[0] - a[0] for a, b in itertools.pairwise(timed))
        cpu = statistics.median(b[1] - a[1] for a, b in itertools.pairwise(timed))
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (wall, cpu, built_peak, peaks[-1], max(item_ids)))
        if trainer.env.is_main:
            print(f"full-corpus training, {args.items:,} item rows row-wise over {len(every)} ranks, "
                  f"{args.steps} steps (median of the last {len(timed) - 1}):", flush=True)
            for rank, (w, c, b, p, n) in enumerate(every):
                print(f"rank {rank}: step {w:.3f} s wall, {c:.3f} s process CPU; peak RSS {b:.2f} GiB "
                      f"after the build, {p:.2f} GiB after {args.steps - 1} steps; at most {n:,} item ids in a "
                      "step's input", flush=True)

    with_trainer(cfg, run_dir, measure)


if __name__ == "__main__":
    main()
