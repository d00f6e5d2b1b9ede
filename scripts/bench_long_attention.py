#!/usr/bin/env python
"""One long history through the pytorch attention backend: forward + backward time and peak
resident memory, full attention and the semi-local window (prints JSON lines; not a test).

    .venv/bin/python scripts/bench_long_attention.py --lengths 4096 16384 --windows 0 1024

Each (length, window) runs in its own process, one sample of H heads of dimension d, causal,
no contextual tokens or candidates, float32, one thread by default. ``step_s``: each step's
seconds (the first builds the plan); ``peak_over_before_mib``: the process's peak resident
set (ru_maxrss) minus its resident set once q, k, v exist, so what the steps added.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hstu.ops import RelativeAttentionBias, hstu_attention


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(length: int, window: int, heads: int, dim: int, steps: int, rab: bool) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(length, heads, dim, requires_grad=True) for _ in range(3))
    offsets = torch.tensor([0, length])
    kw: dict = {"max_attn_len": window}
    if rab:
        kw["rab"] = RelativeAttentionBias(
            torch.randn(2 * length - 1, requires_grad=True), torch.randn(129, requires_grad=True),
            torch.randint(0, 5000, (length,)).cumsum(0))
    before = _rss_mib()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = hstu_attention(q, k, v, offsets, length, alpha=dim**-0.5, scaling_seqlen=length,
                             **kw)
        out.sum().backward()
        times.append(round(time.perf_counter() - start, 3))
        q.grad = k.grad = v.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"length": length, "window": window, "heads": heads, "dim": dim, "rab": rab,
            "threads": torch.get_num_threads(), "step_s": times,
            "best_s": min(times[1:] or times), "peak_rss_mib": round(peak),
            "peak_over_before_mib": round(peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 1024])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rab", action="store_true", help="position and time bias")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.lengths[0], args.windows[0], args.heads, args.dim,
                                 args.steps, args.rab)), flush=True)
        return
    for window in args.windows:
        for length in args.lengths:
            command = [sys.executable, __file__, "--one", "--lengths", str(length), "--windows",
                       str(window), "--heads", str(args.heads), "--dim", str(args.dim),
                       "--steps", str(args.steps), "--threads", str(args.threads)]
            subprocess.run(command + (["--rab"] if args.rab else []), check=True)


if __name__ == "__main__":
    main()
