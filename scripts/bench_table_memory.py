"""Peak resident memory per rank against the size of a row-wise table (docs/performance.md).

    .venv/bin/python scripts/bench_table_memory.py [--rows 2000000 6000000] [--nproc 2] [--steps 3]

Runs the trainer as a user would, ``torchrun --standalone --nproc_per_node NPROC
pretrain_gr_retrieval.py --gin-config-file configs/benchmark_retrieval.gin``, once per item
table size (rows x 64, model_parallel, forced row_wise; the CPU's fused row-wise Adagrad),
for --steps training steps and no evaluation. Each size runs under a helper process of its
own whose ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is the peak RSS of the largest process
of that run (a rank; Linux carries a child's peak up to its parent when it is reaped).
Prints the peak per size, the table's values in GiB, and the slope: GiB of peak RSS per GiB
of table between the smallest and the largest size (1 / NPROC would be the shard alone).
``--expect-slope X`` exits 1 when the slope is above X; ``--repo DIR`` runs the trainer of
another checkout (e.g. a worktree of an older commit) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except OSError:  # ended meanwhile
            kids = []
        out += kids
        todo += kids
    return out


def _hwm(pid: int) -> int:
    """Peak RSS so far of a live process (VmHWM), 0 once it has ended."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _one(rows: int, nproc: int, steps: int, dim: int, repo: Path) -> dict:
    """One trainer run in this (helper) process's only child tree: the largest peak RSS of
    the run, and of the training part (read from the ranks' VmHWM when the last step's
    log line appears, before the final evaluation)."""
    with tempfile.TemporaryDirectory(prefix="hstu_table_mem_") as tmp:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(repo / "pretrain_gr_retrieval.py"),
            "--gin-config-file", str(repo / "configs" / "benchmark_retrieval.gin"),
            "--gin-param", f"item/EmbeddingArgs.item_vocab_size_or_capacity={rows}",
            "--gin-param", 'item/EmbeddingArgs.sharding_override="row_wise"',
            "--gin-param", f"NetworkArgs.item_embedding_dim={dim}",
            "--gin-param", f"TrainerArgs.max_train_iters={steps}",
            "--gin-param", f"TrainerArgs.eval_interval={steps + 1000}",
            "--gin-param", "TrainerArgs.log_interval=1",
            "--gin-param", f'TrainerArgs.run_dir="{tmp}/run"',
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        assert proc.stdout is not None
        lines, train_peak = [], None
        for line in proc.stdout:
            lines.append(line)
            if train_peak is None and f"step {steps}/{steps} " in line:
                train_peak = max((_hwm(p) for p in _descendants(proc.pid)), default=0)
        code = proc.wait()
        if code != 0:
            sys.stderr.write("".join(lines)[-8000:])
            raise SystemExit(f"the run with {rows:,} rows failed (exit {code})")
    held = [x.strip() for x in lines if x.strip().startswith("rank ") and "would hold" not in x]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return {"rows": rows, "dim": dim, "peak_rss_bytes": peak, "train_peak_rss_bytes": train_peak,
            "held": held}


def _worker(rows: int, dim: int, steps: int) -> None:
    """--minimal, one rank: the benchmark preset's tables built and sharded as the trainer
    does (meta device, row_wise item table), then ``steps`` lookups + backward with the
    fused row-wise Adagrad; prints (rank 0) every rank's peak RSS as JSON."""
    import torch
    import torch.distributed as dist
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from hstu.args import EmbeddingArgs, OptimizerArgs
    from hstu.embeddings import build_embeddings, shard_embeddings

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    peaks = {"imported": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    tables = [
        EmbeddingArgs(feature_names=["item"], table_name="item", item_vocab_size_or_capacity=rows,
                      sharding_type="model_parallel", sharding_override="row_wise"),
        EmbeddingArgs(feature_names=["user"], table_name="user", item_vocab_size_or_capacity=10_000,
                      sharding_type="model_parallel"),
        EmbeddingArgs(feature_names=["action"], table_name="action", item_vocab_size_or_capacity=8,
                      sharding_type="data_parallel"),
    ]
    opt = OptimizerArgs(optimizer_str="adam", learning_rate=1e-3, sparse_optimizer_str="rowwise_adagrad",
                        sparse_learning_rate=0.05)
    emb = build_embeddings(tables, dict.fromkeys(("item", "user", "action"), dim), "cpu", seed=1234,
                           sparse_optimizer="rowwise_adagrad", materialize=False)
    emb, _ = shard_embeddings(emb, tables, opt, "cpu", sharding_overrides={"item": "row_wise"})
    peaks["sharded"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gen = torch.Generator().manual_seed(rank)
    batch, per = 32, 128
    for _ in range(steps):
        values = {"item": torch.randint(0, rows, (batch * per,), generator=gen),
                  "user": torch.randint(0, 10_000, (batch,), generator=gen),
                  "action": torch.randint(0, 8, (batch * per,), generator=gen)}
        lengths = torch.tensor([per] * batch + [1] * batch + [per] * batch, dtype=torch.int64)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=list(values), values=torch.cat(list(values.values())), lengths=lengths)
        out = emb(kjt)
        sum(jt.values().sum() for jt in out.values()).backward()
    peaks["stepped"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    every: list = [None] * world
    dist.all_gather_object(every, peaks)
    if rank == 0:
        print("PEAKS " + json.dumps(every), flush=True)
    dist.destroy_process_group()


def _minimal(rows: int, nproc: int, steps: int, dim: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", str(rows), "--steps", str(steps), "--dim", str(dim)]
    # this checkout's hstu, whatever the environment has installed
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=path)
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"the run with {rows:,} rows failed (exit {run.returncode})")
    line = next(x for x in run.stdout.splitlines() if x.startswith("PEAKS "))
    every = json.loads(line[len("PEAKS "):])
    held = [x.strip() for x in run.stdout.splitlines() if x.strip().startswith("rank ")]
    return {"rows": rows, "dim": dim, "peak_rss_bytes": max(p["stepped"] for p in every),
            "per_rank": every, "held": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 6_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--expect-slope", type=float, default=None)
    parser.add_argument("--repo", type=Path, default=ROOT,
                        help="the checkout whose trainer runs (default: this one), e.g. an older commit's worktree")
    parser.add_argument("--minimal", action="store_true",
                        help="the tables alone (build, shard, --steps lookups + backward), not the trainer")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker is not None:
        _worker(a.worker, a.dim, a.steps)
        return
    if a.one is not None:
        print(json.dumps(_one(a.one, a.nproc, a.steps, a.dim, a.repo.resolve())))
        return
    results = []
    for rows in a.rows:
        if a.minimal:
            r = _minimal(rows, a.nproc, a.steps, a.dim)
            r["table_bytes"] = rows * a.dim * 4
            results.append(r)
            stages = ", ".join(
                f"r{i}: " + " / ".join(f"{k} {v / GIB:.3f}" for k, v in p.items())
                for i, p in enumerate(r["per_rank"]))
            print(f"{rows:>11,} rows x {a.dim}: table {r['table_bytes'] / GIB:.3f} GiB, peak RSS "
                  f"of the largest rank {r['peak_rss_bytes'] / GIB:.3f} GiB (GiB after {stages})",
                  flush=True)
            continue
        helper = subprocess.run(
            [sys.executable, __file__, "--one", str(rows), "--nproc", str(a.nproc), "--steps", str(a.steps),
             "--dim", str(a.dim), "--repo", str(a.repo)],
            capture_output=True, text=True, check=False,
        )
        if helper.returncode != 0:
            sys.stderr.write(helper.stdout[-4000:] + helper.stderr[-4000:])
            raise SystemExit(helper.returncode or 1)
        r = json.loads(helper.stdout.strip().splitlines()[-1])
        r["table_bytes"] = rows * a.dim * 4
        results.append(r)
        train = r["train_peak_rss_bytes"]
        train_text = "not seen" if train is None else f"{train / GIB:.3f} GiB"
        print(f"{rows:>11,} rows x {a.dim}: table {r['table_bytes'] / GIB:.3f} GiB, peak RSS of the "
              f"largest process {r['peak_rss_bytes'] / GIB:.3f} GiB (until the last training step: "
              f"{train_text})", flush=True)
        for line in r["held"]:
            print(f"    plan: {line}")
    lo, hi = results[0], results[-1]
    slope = (hi["peak_rss_bytes"] - lo["peak_rss_bytes"]) / (hi["table_bytes"] - lo["table_bytes"])
    print(f"slope: {slope:.3f} GiB of peak RSS per GiB of table over {a.nproc} processes "
          f"({1 / a.nproc:.2f} would be the shard alone)")
    if not a.minimal and lo["train_peak_rss_bytes"] and hi["train_peak_rss_bytes"]:
        train = ((hi["train_peak_rss_bytes"] - lo["train_peak_rss_bytes"])
                 / (hi["table_bytes"] - lo["table_bytes"]))
        print(f"slope until the last training step (build, shard, steps; no evaluation): {train:.3f}")
    if a.expect_slope is not None and slope > a.expect_slope:
        raise SystemExit(f"slope {slope:.3f} above {a.expect_slope}")


if __name__ == "__main__":
    main()
