"""A/B two commits on one host: the same command run alternately in an export of each.

    python scripts/ab_commits.py f6c88eb HEAD --rounds 3
    python scripts/ab_commits.py A B --rounds 2 --cmd '{python} pretrain_gr_retrieval.py ...'

Each commit is exported once (``git archive``) to ``tmp_data/ab/<sha>/``; the command runs there
with this checkout's ``.venv`` (its ``hstu`` is the export's: ``PYTHONPATH`` and the working
directory point at the export). Rounds alternate the order (A B, B A, A B, ...) so that a drift of
the host's state weighs on both. Each run's wall-clock tokens/s (the mean of its progress lines
after the first), its process CPU time (user + system of the command and its waited-for children,
from ``wait4``: the load of other processes on a shared host disturbs wall time far more than CPU
time) and its final metrics are printed in one table, then the per-commit medians and the B/A
ratios.

The default command is the paper's ML-1M retrieval recipe (configs/ml-1m_retrieval.gin) on
ML-100K, as a user would run it on a CPU: 1,683 item rows (``auto``: from the data), the pytorch
kernel, batch 128, 80 steps, one process, ``OMP_NUM_THREADS=2``. Its data is preprocessed once
from ``--raw`` into ``tmp_data/ab/data/ml-100k``, a folder both commits read.

``--load N`` runs N busy-looping processes (nice 0) during every run: the disturbance of other
jobs on a shared host, reproduced. ``--env-a`` / ``--env-b`` set a variable for one side only,
so one commit can be compared with itself under two settings (docs/performance.md, "A/B of two
commits").
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AB_DIR = ROOT / "tmp_data" / "ab"
DEFAULT_RAW = "/work/shared/data/ml-100k"
DEFAULT_CMD = (
    "{python} pretrain_gr_retrieval.py --gin-config-file configs/ml-1m_retrieval.gin"
    " --gin-param 'DatasetArgs.dataset_name=\"ml-100k\"'"
    " --gin-param 'DatasetArgs.dataset_path=\"{data}\"'"
    " --gin-param 'NetworkArgs.kernel_backend=\"pytorch\"'"
    " --gin-param 'TrainerArgs.train_batch_size=128'"
    " --gin-param 'TrainerArgs.max_train_iters=80'"
    " --gin-param 'TrainerArgs.log_interval=16'"
)
_TOKENS = re.compile(r"^step (\d+)/\d+ .*tokens/s ([\d,]+)")
_METRICS = re.compile(r"final retrieval metrics: (.*)$")


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def export(commit: str) -> tuple[str, Path]:
    """The commit's full sha and its exported tree (made once)."""
    sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}")
    out = AB_DIR / sha[:12]
    if not (out / ".exported").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(out)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise SystemExit(f"git archive {sha} failed")
        (out / ".exported").write_text(sha + "\n")
    return sha, out


def prepare_data(python: str, raw: str) -> Path:
    """ML-100K preprocessed into tmp_data/ab/data/ml-100k (once), read by both commits."""
    data = AB_DIR / "data" / "ml-100k"
    if not (data / "metadata.json").exists():
        subprocess.run(
            [python, "-m", "hstu.data.preprocess", "--dataset", "ml-100k", "--raw", raw,
             "--out", str(data.parent), "--quiet"],
            cwd=ROOT, check=True,
        )
    return data


def run_once(cmd: str, cwd: Path, env: dict[str, str]) -> dict:
    """One run: tokens/s (mean over progress lines but the first), CPU s, wall s, metrics."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        lines = proc.stdout.read().splitlines()
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: the run (its whole session) goes too, then re-raise
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    rates = [float(m.group(2).replace(",", "")) for m in map(_TOKENS.match, lines) if m]
    metrics = next((m.group(1) for m in map(_METRICS.search, lines) if m), "")
    if proc.returncode != 0 or not rates:
        tail = "\n".join(lines[-15:])
        raise SystemExit(f"run in {cwd} failed (exit {proc.returncode}):\n{tail}")
    return {
        "tokens_s": statistics.fmean(rates[1:] or rates),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "metrics": metrics,
    }


def start_load(n: int) -> list[subprocess.Popen]:
    """n busy-looping processes at nice 0 (another engineer's job, reproduced)."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(n)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="commit A (e.g. the older one)")
    p.add_argument("b", help="commit B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cmd", default=DEFAULT_CMD,
                   help="command template: {python} (the .venv's), {data} (the ML-100K folder)")
    p.add_argument("--raw", default=DEFAULT_RAW, help="raw ML-100K folder or zip")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--load", type=int, default=0, help="busy processes beside every run")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the runs (repeatable)")
    p.add_argument("--env-a", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of A's runs only (A and B may then be one commit)")
    p.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of B's runs only")
    args = p.parse_args()
    # a SIGTERM unwinds like Ctrl-C, so the run and the load processes are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    python = str(ROOT / ".venv" / "bin" / "python")
    data = prepare_data(python, args.raw) if "{data}" in args.cmd else None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.update(kv.split("=", 1) for kv in args.env)
    sides = []
    for label, commit, extra in (("A", args.a, args.env_a), ("B", args.b, args.env_b)):
        sha, tree = export(commit)
        side_env = dict(env, PYTHONPATH=str(tree))
        side_env.update(kv.split("=", 1) for kv in extra)
        name = f"{label} {sha[:10]}" + (" " + " ".join(extra) if extra else "")
        sides.append((name, tree, side_env))
        print(f"{name}: {_git('log', '-1', '--format=%s', sha)[:100]}")
    print(f"command: {args.cmd}\nOMP_NUM_THREADS={args.threads}, load {args.load}, "
          f"{args.rounds} rounds alternating", flush=True)
    width = max(len(name) for name, _, _ in sides)
    print(f"{'side':<{width}} {'round':>5} {'tokens/s':>9} {'cpu s':>7} {'wall s':>7}  metrics",
          flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    cmd = args.cmd.format(python=shlex.quote(python), data=data)
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for name, tree, run_env in order:
            load = start_load(args.load)
            try:
                res = run_once(cmd, tree, run_env)
            finally:
                for proc in load:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            results[name].append(res)
            print(f"{name:<{width}} {r + 1:>5} {res['tokens_s']:>9,.0f} {res['cpu_s']:>7.1f} "
                  f"{res['wall_s']:>7.1f}  {res['metrics']}", flush=True)
    a, b = (name for name, _, _ in sides)
    med = {s: {k: statistics.median(x[k] for x in results[s]) for k in ("tokens_s", "cpu_s")}
           for s in results}
    for s in (a, b):
        print(f"median {s}: {med[s]['tokens_s']:,.0f} tokens/s, {med[s]['cpu_s']:.1f} cpu s")
    print(f"B/A: tokens/s x{med[b]['tokens_s'] / med[a]['tokens_s']:.3f}, "
          f"cpu s x{med[b]['cpu_s'] / med[a]['cpu_s']:.3f}")
    same = len({x["metrics"] for s in results for x in results[s]}) == 1
    print("metrics identical in every run" if same else "metrics DIFFER between runs")


if __name__ == "__main__":
    main()
