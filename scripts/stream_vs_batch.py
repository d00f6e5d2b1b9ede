"""Streaming against a frozen batch model on a replay of ML-100K by day (docs/online.md
"Streaming against a frozen batch model"; figures in docs/results.md).

Three runs per task, each through the real entry point (one process) with the ML-100K stream
preset (configs/ml-100k_stream_<task>.gin):

  A  streaming from the start: every window trained on (one pass), the windows after the cut
     evaluated first (``StreamArgs.evaluate_from``: the ones before are not compared);
  B  batch phase on the windows within the first ``--cut`` of the events (``--epochs`` passes,
     not evaluated), then frozen: every later window evaluated, never trained on;
  C  the same batch phase, then streaming (evaluated, then trained on).

The table is over the windows after the cut, the same events in the same order in all three:
each metric is the mean of the windows' values weighted by their ``eval_events`` (pooled over
events; AUC and NE are per window, then weighted: not the AUC / NE of all those events at
once). Wall and CPU seconds are the child process's (CPU: user + system, from rusage).

    python scripts/stream_vs_batch.py --raw ../shared/data/ml-100k --out runs/stream_vs_batch

A run whose folder holds ``done.json`` is not run again (``--force`` reruns it); ``--tasks``
and ``--runs`` choose a subset. Prints the tables; writes nothing else outside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from hstu.training.report import stream_windows

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"retrieval": ("HR@10", "NDCG@10"), "ranking": ("AUC", "NE", "loss")}
RUNS = {
    "A": "streaming from the start",
    "B": "batch on the first {cut:g}, then frozen",
    "C": "batch on the first {cut:g}, then streaming",
}


def command(task: str, run: str, raw: str, run_dir: Path, cut: float, epochs: int,
            lr_scale: float, seed: int | None = None) -> list[str]:
    params = [
        "StreamArgs.replay_dataset='ml-100k'",
        f"StreamArgs.replay_raw='{raw}'",
        f"TrainerArgs.run_dir='{run_dir}'",
        f"TrainerArgs.ckpt_save_dir='{run_dir / 'ckpt'}'",
        "TrainerArgs.keep_last_n=1",
    ]
    if seed is not None:  # else the preset's
        params += [f"TrainerArgs.seed={seed}"]
    if run == "A":  # the windows before the cut are trained on, not evaluated (not compared)
        params += [f"StreamArgs.evaluate_from={cut}"]
    else:
        params += [f"StreamArgs.batch_until={cut}", f"StreamArgs.batch_epochs={epochs}",
                   f"StreamArgs.train={run == 'C'}"]
    if run == "C":  # its learning rates after the batch phase (A streams at the preset's)
        params += [f"StreamArgs.stream_lr_scale={lr_scale}"]
    cmd = [sys.executable, str(ROOT / f"pretrain_gr_{task}.py"), "--gin-config-file",
           str(ROOT / "configs" / f"ml-100k_stream_{task}.gin")]
    for p in params:
        cmd += ["--gin-param", p]
    return cmd


def run_one(cmd: list[str], run_dir: Path, threads: int) -> dict[str, float]:
    """Runs ``cmd`` (its output into run_dir/output.log); returns wall and CPU seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(run_dir / "output.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (run_dir / "output.log").read_text().splitlines()[-20:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "threads": threads}


def windows_of(run_dir: Path) -> dict[int, dict[str, float]]:
    """The run's ``stream`` rows of metrics.csv, per window number."""
    return {int(w["window"]): w for w in stream_windows(str(run_dir))}


def pooled(by_window: dict[int, dict[str, float]], after: int, names: tuple[str, ...]
           ) -> dict[str, float]:
    """Each metric over the windows numbered > ``after``, weighted by their eval_events."""
    rows = [r for w, r in by_window.items() if w > after and r.get("eval_events", 0) > 0]
    weight = sum(r["eval_events"] for r in rows)
    out = {n: sum(r[n] * r["eval_events"] for r in rows) / weight for n in names}
    out.update(eval_events=weight, windows=float(len(rows)),
               trained_after=sum(r.get("trained_events", 0.0) for r in rows))
    return out


def table(task: str, out: Path, cut: float, until: float = 1.0) -> None:
    dirs = {r: out / task / r for r in RUNS if (out / task / r / "done.json").exists()}
    if "B" not in dirs:
        print(f"{task}: run B not done, no table")
        return
    by = {r: windows_of(d) for r, d in dirs.items()}
    phase = [row for row in by["B"].values() if "batch_windows" in row]
    assert len(phase) == 1, "run B has no batch phase row"
    n_batch = int(phase[0]["window"])
    # the windows compared: after the cut, ending within the first ``until`` of the events
    total = sum(row["events"] for row in by["B"].values())
    seen, last = 0.0, n_batch
    for w in sorted(by["B"]):
        seen += by["B"][w]["events"]
        if w > n_batch and seen <= until * total + 1e-9:
            last = w
    by = {r: {w: row for w, row in rows.items() if w <= last} for r, rows in by.items()}
    names = METRICS[task]
    events = {r: [by[r][w]["eval_events"] for w in sorted(by[r]) if w > n_batch] for r in by}
    assert all(e == events["B"] for e in events.values()), "the runs evaluated different events"
    print(f"\n{task}: ML-100K by day; batch phase = windows 1-{n_batch} "
          f"({int(phase[0]['events'])} events, {int(phase[0]['batch_epochs'])} passes, "
          f"{int(phase[0]['train_steps'])} steps); table over windows {n_batch + 1}-{last}")
    head = ["run", *names, "eval events", "events trained after the cut", "wall s", "CPU s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r, d in dirs.items():
        m = pooled(by[r], n_batch, names)
        cost = json.loads((d / "done.json").read_text())
        scale = cost.get("stream_lr_scale")
        label = RUNS[r].format(cut=cut) + (f" (stream LR x{scale:g})" if scale not in (None, 1.0) else "")
        print(f"| {r}: {label} | " + " | ".join(f"{m[n]:.4f}" for n in names)
              + f" | {int(m['eval_events'])} | {int(m['trained_after'])} | {cost['wall_s']:.0f} | "
              f"{cost['cpu_s']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True, help="ML-100K raw files (GroupLens folder or archive)")
    ap.add_argument("--out", required=True, help="folder of the runs (one per task and run)")
    ap.add_argument("--tasks", nargs="+", default=["retrieval", "ranking"], choices=list(METRICS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--cut", type=float, default=0.8, help="StreamArgs.batch_until of B and C")
    ap.add_argument("--epochs-retrieval", type=int, default=4,
                    help="StreamArgs.batch_epochs of retrieval's B and C")
    ap.add_argument("--epochs-ranking", type=int, default=2,
                    help="StreamArgs.batch_epochs of ranking's B and C")
    ap.add_argument("--stream-lr-scale", type=float, default=1.0,
                    help="StreamArgs.stream_lr_scale of C (its learning rates after the batch "
                         "phase)")
    ap.add_argument("--until", type=float, default=1.0,
                    help="compare the windows that end within this fraction of the events (a "
                         "validation stretch before a later cut: e.g. --cut 0.6 --until 0.8)")
    ap.add_argument("--seed", type=int, default=None,
                    help="TrainerArgs.seed of every run (default: the presets' seed, 1)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--force", action="store_true", help="rerun runs already done")
    ap.add_argument("--report-only", action="store_true", help="print the tables, run nothing")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    raw = str(Path(args.raw).resolve())
    for task in args.tasks:
        epochs = args.epochs_retrieval if task == "retrieval" else args.epochs_ranking
        for r in args.runs if not args.report_only else []:
            run_dir = out / task / r
            if (run_dir / "done.json").exists() and not args.force:
                continue
            if run_dir.exists():  # a run cut short or rerun: from scratch
                import shutil

                shutil.rmtree(run_dir)
            print(f"[stream_vs_batch] {task} {r}: {RUNS[r].format(cut=args.cut)}", flush=True)
            cost = run_one(command(task, r, raw, run_dir, args.cut, epochs, args.stream_lr_scale,
                                   args.seed),
                           run_dir, args.threads)
            cost["stream_lr_scale"] = args.stream_lr_scale if r == "C" else None
            (run_dir / "done.json").write_text(json.dumps(cost))
            print(f"[stream_vs_batch] {task} {r}: {cost['wall_s']:.0f} s wall, "
                  f"{cost['cpu_s']:.0f} s CPU", flush=True)
        table(task, out, args.cut, args.until)


if __name__ == "__main__":
    main()
