"""Step time of the train pipelines side by side, and what the embedding input distribution
costs inside a step. Run under torchrun (one process per rank):

    .venv/bin/torchrun --standalone --nproc_per_node 2 scripts/bench_pipelines.py \
        [--preset configs/benchmark_ranking.gin] [--steps 40] [--warmup 5] [--gin-param ...]

For each pipeline (none, native) the same trainer is built and run for warmup + steps
steps; the mean step time of the measured steps is printed. Then the input distribution of
the sharded collection (the all-to-alls that send each id to the rank holding its row) is
timed alone on the same batches: what `none` pays inside every forward and `native` runs for
the next batch during the current one. Figures are per step, max over ranks. A JSON line
with the numbers ends the output (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _trainer(preset: str, params: list[str], pipeline: str, steps: int, run_dir: str):
    import gin

    from hstu.config import load_config
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer

    gin.clear_config()
    task = "ranking" if "ranking" in os.path.basename(preset) else "retrieval"
    cfg = load_config(preset, [
        *params, f'TrainerArgs.pipeline_type="{pipeline}"', f"TrainerArgs.max_train_iters={steps}",
        f"TrainerArgs.eval_interval={10 * steps}", "TrainerArgs.max_eval_iters=1",
        f"TrainerArgs.log_interval={steps}", f'TrainerArgs.run_dir="{run_dir}"',
    ], task=task, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    set_seed(cfg.trainer.seed)
    return Trainer(cfg, env, run_dir, ""), env


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time_steps(trainer, warmup: int, steps: int) -> float:
    """Mean seconds per step over the last ``steps`` steps (a barrier closes each window):
    the trainer's own batches, pipeline and ``train_step``."""
    feed = trainer.open_batches()
    it = iter(feed)
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(it)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(it)
    dist.barrier()
    feed.close()
    return (time.perf_counter() - t0) / max(steps, 1)


class _Timed:
    """Wraps an awaitable of a sharded module's input_dist; adds the time of its waits."""

    def __init__(self, inner, acc: list) -> None:
        self.inner, self.acc = inner, acc

    def wait(self):
        t0 = time.perf_counter()
        out = self.inner.wait()
        self.acc[0] += time.perf_counter() - t0
        return _Timed(out, self.acc) if hasattr(out, "wait") else out


def _time_input_dist_in_steps(trainer, warmup: int, steps: int) -> float:
    """pipeline none: seconds per step spent inside the sharded collections' input
    distribution (launch and both waits), measured within real training steps."""
    from torchrec.distributed.types import ShardedModule

    acc = [0.0]
    for module in trainer.model.sparse.modules():
        if isinstance(module, ShardedModule):
            original = module.input_dist

            def timed(ctx, features, _original=original):
                t0 = time.perf_counter()
                awaitable = _original(ctx, features)
                acc[0] += time.perf_counter() - t0
                return _Timed(awaitable, acc)

            module.input_dist = timed
    _time_steps(trainer, warmup, 0)
    acc[0] = 0.0
    _time_steps(trainer, 0, steps)
    return acc[0] / steps


def _input_dist_alone(trainer, batches: int) -> float:
    """Seconds per batch of the sharded collections' input distribution, alone."""
    from torchrec.distributed.types import ShardedModule

    sharded = [m for m in trainer.model.sparse.modules() if isinstance(m, ShardedModule)]
    times = []
    for i, batch in enumerate(trainer.built.train_loader):
        if i >= batches:
            break
        dist.barrier()
        t0 = time.perf_counter()
        for module in sharded:
            ctx = module.create_context()
            module.input_dist(ctx, batch.features).wait().wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=os.path.join(ROOT, "configs", "benchmark_ranking.gin"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gin-param", action="append", default=[])
    ap.add_argument("--out", default=os.path.join(ROOT, "tmp_data", "bench_pipelines"))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {}
    for pipeline in ("none", "native", "none", "native"):  # twice, interleaved
        trainer, _env = _trainer(a.preset, a.gin_param, pipeline, a.warmup + a.steps,
                                os.path.join(a.out, pipeline))
        step = _max_over_ranks(_time_steps(trainer, a.warmup, a.steps))
        results.setdefault(pipeline, []).append(step)
        if pipeline == "none" and "input_dist_s" not in results:
            results["input_dist_s"] = _max_over_ranks(_input_dist_alone(trainer, a.steps))
            results["input_dist_in_step_s"] = _max_over_ranks(
                _time_input_dist_in_steps(trainer, a.warmup, a.steps))
        trainer.close()
    world = dist.get_world_size()
    summary = {
        "preset": os.path.basename(a.preset), "world": world,
        "step_s_none": min(results["none"]), "step_s_native": min(results["native"]),
        "input_dist_s_per_step": results["input_dist_s"],
        "input_dist_in_none_step_s": results["input_dist_in_step_s"],
    }
    summary["native_speedup"] = summary["step_s_none"] / summary["step_s_native"]
    if dist.get_rank() == 0:
        print(f"{summary['preset']} on {world} process(es), {a.steps} steps after {a.warmup} warm-up:")
        print(f"  step time   none   {summary['step_s_none'] * 1e3:8.1f} ms  (runs: "
              f"{', '.join(f'{x * 1e3:.1f}' for x in results['none'])})")
        print(f"  step time   native {summary['step_s_native'] * 1e3:8.1f} ms  (runs: "
              f"{', '.join(f'{x * 1e3:.1f}' for x in results['native'])})")
        print(f"  input-dist alone   {summary['input_dist_s_per_step'] * 1e3:8.1f} ms per step "
              f"({summary['input_dist_s_per_step'] / summary['step_s_none']:.0%} of a none step)")
        print(f"  input-dist inside a none step {summary['input_dist_in_none_step_s'] * 1e3:8.1f} ms "
              f"(launch + waits, incl. waiting for the other rank; "
              f"{summary['input_dist_in_none_step_s'] / summary['step_s_none']:.0%} of the step)")
        print(f"  native / none speed-up {summary['native_speedup']:.3f}x")
        print(json.dumps(summary))
    from hstu.training.distributed import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
