#!/usr/bin/env python
"""Memory of the full-corpus training loss with RetrievalArgs.exclude_history_from_loss, before
and after issue 39 (prints figures; not a test).

    .venv/bin/python scripts/bench_history_exclusion.py                  # H = 512, 1024, 4096
    .venv/bin/python scripts/bench_history_exclusion.py --histories 4096 --samples 16

One step's loss, forward and backward, on ``--samples`` histories of H items each (Q = B (H - 1)
queries, I = ``--items`` corpus items, width ``--dim``; ids drawn from the corpus, so histories
repeat items):
- ``old``: the code of commit ``--old-ref`` (11e40fe), read from git: the (query, item) pair
  list (``history_pairs``: sum over samples of H^2 / 2 entries, built with a repeat_interleave
  and two boolean-mask indexings) and the fused loss masking them block by block;
- ``new``: :class:`hstu.ops.losses.HistoryWindow`: on a CPU (here) the (query, item) pairs of
  8 blocks of queries at a time, at most 2^18 pairs listed at once; on other devices a [rows, W]
  window of the batch's ids per block of queries (at most 2^16 entries at a time).
Each case runs in its own process. Peak memory is the growth of the process's peak resident set
(Linux VmHWM, reset before the loss) over its resident set then: it includes the loss's [Q, I]
buffer (the same in both, printed apart) and everything the exclusion adds. CPU seconds are the
process's own (``resource.getrusage``), one thread: the host is shared, wall time is not kept.
The old path is skipped where its pair list would exceed ``--old-max-pairs``; it says so.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hstu.ops.losses import HistoryWindow, full_softmax_loss


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _old_code(ref: str) -> tuple[types.ModuleType, types.FunctionType]:
    """(the old hstu.ops.losses.full_corpus module, the old history_pairs) from git."""
    def show(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True, capture_output=True, text=True
        ).stdout

    module = types.ModuleType("old_full_corpus")
    exec(compile(show("hstu/ops/losses/full_corpus.py"), "old_full_corpus", "exec"), module.__dict__)  # noqa: S102
    tree = ast.parse(show("hstu/model/retrieval.py"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "history_pairs")
    scope: dict = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "old_history_pairs", "exec"), scope)  # noqa: S102
    return module, scope["history_pairs"]


def one_case(path: str, samples: int, hist: int, items: int, dim: int, ref: str) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    queries_per = hist - 1
    num_q = samples * queries_per
    item_ids = torch.randint(0, items, (samples * hist,), generator=g)
    q_seg = torch.arange(samples).repeat_interleave(queries_per)
    q_idx = torch.arange(queries_per).repeat(samples)
    item_starts = torch.arange(samples) * hist
    target = item_ids[item_starts[q_seg] + q_idx + 1]
    queries = (F.normalize(torch.randn(num_q, dim, generator=g), dim=1) / 0.1).requires_grad_()
    corpus = F.normalize(torch.randn(items, dim, generator=g), dim=1).requires_grad_()
    if path == "old":
        old_module, old_pairs = _old_code(ref)
    def step() -> float:
        if path == "old":
            masked = old_pairs(q_seg, q_idx, item_starts, item_ids, target)
            loss, _ = old_module.full_softmax_loss(queries, corpus, target, None, masked)
        else:
            window = HistoryWindow(item_ids, item_starts[q_seg], q_idx + 1, hist - 1)
            loss, _ = full_softmax_loss(queries, corpus, target, None, window)
        loss.backward()
        return float(loss)

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    loss = step()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _status_kib("VmHWM")
    return {
        "path": path, "H": hist, "Q": num_q, "loss": loss,
        "peak_growth_mib": (peak - base) / 1024,
        "qi_buffer_mib": num_q * items * 4 / 2**20,
        "pairs": samples * hist * (hist - 1) // 2,
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--histories", type=int, nargs="+", default=[512, 1024, 4096])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--items", type=int, default=1682)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--old-ref", default="11e40fe")
    ap.add_argument("--old-max-pairs", type=float, default=1e8)
    ap.add_argument("--one", nargs=2, metavar=("PATH", "H"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_case(args.one[0], args.samples, int(args.one[1]), args.items, args.dim, args.old_ref)))
        return
    print(f"B={args.samples} samples, I={args.items} items, D={args.dim}, 1 thread, CPU")
    print(f"{'H':>5} {'path':>4} {'Q':>7} {'pairs':>11} {'[Q,I] MiB':>10} {'peak MiB':>9} "
          f"{'over [Q,I]':>10} {'CPU s':>6} {'loss':>14}")
    for hist in args.histories:
        for path in ("old", "new"):
            pairs = args.samples * hist * (hist - 1) // 2
            if path == "old" and pairs > args.old_max_pairs:
                print(f"{hist:>5} {path:>4}  skipped: {pairs:.2e} pairs > --old-max-pairs {args.old_max_pairs:.0e}")
                continue
            cmd = [sys.executable, __file__, "--one", path, str(hist), "--samples", str(args.samples),
                   "--items", str(args.items), "--dim", str(args.dim), "--old-ref", args.old_ref]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{hist:>5} {path:>4} {r['Q']:>7} {r['pairs']:>11.3e} {r['qi_buffer_mib']:>10.1f} "
                  f"{r['peak_growth_mib']:>9.1f} {r['peak_growth_mib'] - r['qi_buffer_mib']:>10.1f} "
                  f"{r['cpu_s']:>6.2f} {r['loss']:>14.6f}")


if __name__ == "__main__":
    main()
