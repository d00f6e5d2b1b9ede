"""A sequence block's two layouts side by side in one process (issue 51): "padded" (every
sample padded to DatasetArgs.max_sequence_length, SASRec's only layout before) and "jagged"
(the real tokens only), on the same trainer:

    python scripts/bench_sasrec_layout.py --gin-config-file configs/ml-100k_sasrec_retrieval.gin \\
        --data tmp_data/ml-100k [--steps 4] [--rounds 2] [--layouts padded,jagged] [--gin-param NAME=VALUE ...]

``--warmup`` untimed training steps of each layout, then ``--rounds`` rounds of ``--steps`` of
the trainer's own training steps per layout, the layouts in turn (real jagged tokens/s over
all of them), then ``--eval-repeats`` full evaluations per layout, in turn
(``hstu.training.evaluate.evaluate``: every validation user against the whole catalogue;
the best time, per user). The evaluations come after all the training, so they score one
model in each layout: the script prints whether their metrics are bitwise equal, else each
difference. One process (world size 1), ``--threads`` threads; wall-clock and CPU times.

``--cut N`` also measures the first ``--data`` with every history cut into runs of N events
(one user's consecutive events become several short histories, the last run taking any
remainder under N): the same catalogue, items and model, histories of about N tokens against
``max_sequence_length``, so that the two datasets' tokens/s differ by the layout's cost of
short histories alone; ``--cut-batch-size`` sets the cut data's batch (samples a step; default
the config's). With several datasets a last table gives each one's tokens/s over the first's.
docs/performance.md "SASRec on the tokens" has figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin-config-file", required=True)
    parser.add_argument("--data", required=True, action="append",
                        help="a preprocessed dataset's folder (repeat for several, in turn)")
    parser.add_argument("--cut", type=int, default=0,
                        help="also the first --data with its histories cut into runs of N events")
    parser.add_argument("--cut-batch-size", type=int, default=0,
                        help="train_batch_size of the cut data (0: the config's)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of steps, layouts in turn")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each layout first")
    parser.add_argument("--eval-repeats", type=int, default=2, help="evaluations per layout")
    parser.add_argument("--layouts", default="padded,jagged", help="comma-separated, in order")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--gin-param", action="append", default=[])
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    unknown = set(layouts) - {"padded", "jagged"}
    if unknown or len(set(layouts)) != len(layouts):
        parser.error(f"--layouts: {args.layouts!r}: each of padded, jagged at most once")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = tempfile.mkdtemp(prefix="bench_sasrec_layout_")
    datasets = [(os.path.abspath(d), []) for d in args.data]
    if args.cut:
        cut = cut_histories(datasets[0][0], args.cut, os.path.join(run_dir, "data"))
        batch = [f"TrainerArgs.train_batch_size={args.cut_batch_size}"] if args.cut_batch_size else []
        datasets.append((cut, batch))
    speeds = {}
    for data, extra in datasets:
        speeds[data] = bench(args, layouts, data, extra, os.path.join(run_dir, str(len(speeds))))
    if len(datasets) > 1:
        first = datasets[0][0]
        print(f"\ntraining tokens/s over {first}'s")
        for data, _ in datasets[1:]:
            print(f"  {data}: " + " ".join(
                f"{layout} {speeds[data][layout] / speeds[first][layout]:.3f}"
                f" ({speeds[data][layout]:,.0f} / {speeds[first][layout]:,.0f})"
                for layout in layouts))


def cut_histories(data: str, run: int, out: str) -> str:
    """``data``'s events with each history cut into runs of ``run`` events (the last run of a
    user takes any remainder under ``run``), preprocessed as own data into ``out``; returns
    the dataset's folder."""
    import csv

    import pyarrow.parquet as pq

    from hstu.data.data_args import CustomDataArgs
    from hstu.data.preprocess import preprocess

    if run < 2:
        raise SystemExit(f"--cut {run}: a history needs at least 2 events")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "events.csv")
    table = pq.read_table(os.path.join(data, "sequences.parquet"),
                          columns=["user_id", "item_ids", "timestamps"]).to_pylist()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for row in table:
            items, times = row["item_ids"], row["timestamps"]
            runs = max(1, len(items) // run)
            for i, (item, t) in enumerate(zip(items, times)):
                writer.writerow([f"{row['user_id']}:{min(i // run, runs - 1)}", item, t])
    name = f"{os.path.basename(data)}-cut{run}"
    preprocess("custom", raw=path, out=out, output_name=name, verbose=False,
               custom=CustomDataArgs(path=path))
    return os.path.join(out, name)


def bench(args, layouts: list[str], data: str, extra: list[str], run_dir: str) -> dict[str, float]:
    """One dataset: its training tokens/s per layout (printed with the evaluation's times)."""
    import torch

    from hstu.config import load_config
    from hstu.training.evaluate import evaluate
    from hstu.training.run import with_trainer

    total = len(layouts) * (args.warmup + args.rounds * args.steps)
    cfg = load_config(args.gin_config_file, [
        f'DatasetArgs.dataset_path="{data}"',
        f'DatasetArgs.dataset_name="{os.path.basename(data)}"', f'TrainerArgs.run_dir="{run_dir}"',
        'TrainerArgs.pipeline_type="none"', f"TrainerArgs.max_train_iters={total}",
        *args.gin_param, *extra,
    ], task="retrieval", world_size=1)
    speed: dict[str, float] = {}

    def measure(trainer) -> None:
        block = trainer.model.dense_module.block
        users = {"n": 0}

        def count(_module, inputs) -> None:
            users["n"] += inputs[1].numel() - 1  # offsets [B+1]

        feed = trainer.open_batches()
        batches = iter(feed)
        tokens = dict.fromkeys(layouts, 0)
        seconds = dict.fromkeys(layouts, 0.0)
        cpu = dict.fromkeys(layouts, 0.0)
        for layout in layouts:  # untimed: one-time costs (allocator, kernels) of each layout
            block.sequence_layout = layout
            for _ in range(args.warmup):
                trainer.train_step(batches)
                feed.pop_cost()
        for _ in range(args.rounds):  # interleaved, so that load on the host hits both alike
            for layout in layouts:
                block.sequence_layout = layout
                trainer.model.train()
                start, cpu_start = time.perf_counter(), time.process_time()
                costs = []
                for _ in range(args.steps):
                    trainer.train_step(batches)
                    costs.append(feed.pop_cost())
                seconds[layout] += time.perf_counter() - start
                cpu[layout] += time.process_time() - cpu_start
                tokens[layout] += sum(c.tokens for c in costs)
        feed.close()
        hook = block.register_forward_pre_hook(count)
        eval_s = {layout: float("inf") for layout in layouts}
        eval_cpu = {layout: float("inf") for layout in layouts}
        metrics: dict[str, dict[str, float]] = {}
        num_users = 0
        for _ in range(args.eval_repeats):
            for layout in layouts:
                block.sequence_layout = layout
                users["n"] = 0
                start, cpu_start = time.perf_counter(), time.process_time()
                metrics[layout] = evaluate(
                    trainer.model, trainer.built.eval_loader, cfg, trainer.env, None
                )
                eval_s[layout] = min(eval_s[layout], time.perf_counter() - start)
                eval_cpu[layout] = min(eval_cpu[layout], time.process_time() - cpu_start)
                num_users = users["n"]
        hook.remove()
        speed.update({layout: tokens[layout] / seconds[layout] for layout in layouts})
        print(f"\n{type(block).__name__}, {args.gin_config_file} on {data}, max_sequence_length "
              f"{cfg.dataset.max_sequence_length}, batch {cfg.trainer.train_batch_size}, "
              f"{tokens[layouts[0]] / (args.rounds * args.steps):,.0f} tokens a step, "
              f"{torch.get_num_threads()} threads; "
              f"{args.rounds} x {args.steps} training steps and the best of "
              f"{args.eval_repeats} evaluations per layout", flush=True)
        print("wall-clock seconds, and CPU seconds (all threads: what a shared host leaves "
              "less noisy)")
        print(f"{'layout':8s} {'tokens/s':>10s} {'tokens/CPU-s':>12s} {'step s':>7s} "
              f"{'eval s':>7s} {'eval CPU-s':>10s} {'users':>6s} {'ms/user':>8s} "
              f"{'CPU-ms/user':>11s}")
        for layout in layouts:
            steps, users_ = args.rounds * args.steps, max(1, num_users)
            print(f"{layout:8s} {tokens[layout] / seconds[layout]:10,.0f} "
                  f"{tokens[layout] / cpu[layout]:12,.0f} {seconds[layout] / steps:7.3f} "
                  f"{eval_s[layout]:7.2f} {eval_cpu[layout]:10.2f} {num_users:6d} "
                  f"{1e3 * eval_s[layout] / users_:8.3f} {1e3 * eval_cpu[layout] / users_:11.3f}")
        first = metrics[layouts[0]]
        for layout in layouts[1:]:
            other = metrics[layout]
            diff = {k: abs(other[k] - first[k]) for k in first if other[k] != first[k]}
            print(f"metrics {layouts[0]} vs {layout}: " + (
                "bitwise equal" if not diff
                else "differ: " + " ".join(f"{k} by {v:.3g}" for k, v in diff.items())))
        for layout in layouts:
            print(f"  {layout}: " + " ".join(f"{k} {v:.6g}" for k, v in metrics[layout].items()))

    with_trainer(cfg, run_dir, measure)
    return speed


if __name__ == "__main__":
    main()
