"""Wall time and peak memory of one full retrieval evaluation (every validation user against
the whole catalogue, exact), on every rank, with the preset's model as built (untrained):

    torchrun --standalone --nproc_per_node 2 scripts/bench_full_eval.py \\
        --gin-config-file configs/kuairand-1k_retrieval.gin --data tmp_data/kuairand-1k \\
        [--gin-param NAME=VALUE ...]

Times ``hstu.training.evaluate.evaluate`` between two barriers (the model's forward over the
users, the catalogue's vectors, the targets' scores and the counts ahead of them); rank 0
prints each rank's seconds and peak resident memory, then the metrics. docs/performance.md
"Scale" has figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin-config-file", required=True)
    parser.add_argument("--data", required=True, help="the preprocessed dataset's folder")
    parser.add_argument("--gin-param", action="append", default=[])
    args = parser.parse_args()

    import torch.distributed as dist

    from hstu.config import load_config
    from hstu.training.evaluate import evaluate
    from hstu.training.run import with_trainer

    run_dir = tempfile.mkdtemp(prefix="bench_full_eval_")
    cfg = load_config(
        args.gin_config_file,
        [f'DatasetArgs.dataset_path="{args.data}"', f'TrainerArgs.run_dir="{run_dir}"', *args.gin_param],
        task="retrieval", world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )

    def measure(trainer) -> None:
        dist.barrier()
        start = time.perf_counter()
        metrics = evaluate(trainer.model, trainer.built.eval_loader, cfg, trainer.env, None)
        dist.barrier()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (seconds, peak))
        if trainer.env.is_main:
            for rank, (sec, gib) in enumerate(every):
                print(f"rank {rank}: full evaluation {sec:.1f} s, peak RSS {gib:.2f} GiB", flush=True)
            print("metrics: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    with_trainer(cfg, run_dir, measure)


if __name__ == "__main__":
    main()
