#!/usr/bin/env python
"""The pytorch attention's two paths for dense chunks, side by side (prints figures; not a test).

    .venv/bin/python scripts/bench_attention_paths.py                  # the ML-100K preset's shapes
    .venv/bin/python scripts/bench_attention_paths.py --heads 2 --head-dim 64 --batch 128

A batch of dense chunks runs in one autograd function that does the padded layout and the
gradients by hand (the default); ``dense_by_hand=False`` runs the same chunks through
autograd's ops. Each batch: q, k, v split from one [T, 4 H d] projection (as a layer has
them), causal, relative attention bias with position and time terms, alpha 1, N 211. Batch
lengths: each user's history of the preprocessed ML-100K (tmp_data/ml-100k) capped at the
maximum length, B users drawn at random; without that folder a log-normal mix of the same
mean (106) and cap. The two paths alternate, so a busy host slows both alike; figures are
medians per call, forward and forward + backward, one CPU thread unless --threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hstu.ops import RelativeAttentionBias
from hstu.ops.pytorch_attention import pytorch_hstu_attention


def history_lengths(max_len: int, seed: int) -> tuple[list[int], str]:
    path = ROOT / "tmp_data" / "ml-100k" / "sequences.parquet"
    if path.exists():
        import pyarrow.parquet as pq

        column = pq.read_table(path, columns=["item_ids"]).column("item_ids")
        return [min(max_len, len(v)) for v in column.to_pylist()], str(path.relative_to(ROOT))
    g = torch.Generator().manual_seed(seed)
    drawn = torch.exp(torch.randn(943, generator=g) * 0.9 + 4.3).round().clamp(2, max_len)
    return [int(x) for x in drawn], "log-normal mix (no tmp_data/ml-100k)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--batch", type=int, default=64, help="samples per call (one rank's batch)")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=50)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--batches", type=int, default=6, help="random batches, each timed")
    p.add_argument("--repeats", type=int, default=5, help="timings per batch and path")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lengths, source = history_lengths(a.max_len, 0)
    g = torch.Generator().manual_seed(0)
    h, d = a.heads, a.head_dim
    times: dict[tuple[bool, str], list[float]] = {}
    tokens = []
    for _ in range(a.batches):
        pick = torch.randint(0, len(lengths), (a.batch,), generator=g)
        lens = torch.tensor([lengths[i] for i in pick.tolist()])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
        n = int(offsets[-1])
        tokens.append(n)
        uvqk = torch.randn(n, 4 * h * d, generator=g).requires_grad_()
        stamps = torch.randint(0, 10**6, (n,), generator=g).sort().values
        pos = (torch.randn(2 * a.max_len - 1, generator=g) * 0.01).requires_grad_()
        ts = (torch.randn(129, generator=g) * 0.01).requires_grad_()
        rab = RelativeAttentionBias(pos, ts, stamps, stamps[offsets[1:] - 1] + 60)
        upstream = torch.randn(n, h, d, generator=g)

        def call(by_hand: bool, rab=rab, uvqk=uvqk, offsets=offsets, n=n):
            _u, q, k, v = uvqk.split(h * d, dim=-1)
            return pytorch_hstu_attention(
                q.reshape(n, h, d), k.reshape(n, h, d), v.reshape(n, h, d), offsets, a.max_len,
                dense_by_hand=by_hand, alpha=1.0, scaling_seqlen=211, causal=True, rab=rab)

        for _ in range(a.repeats):
            for by_hand in (True, False):
                t0 = time.perf_counter()
                with torch.no_grad():
                    call(by_hand)
                t1 = time.perf_counter()
                (call(by_hand) * upstream).sum().backward()
                t2 = time.perf_counter()
                times.setdefault((by_hand, "forward"), []).append((t1 - t0) * 1e3)
                times.setdefault((by_hand, "forward+backward"), []).append((t2 - t1) * 1e3)
    print(f"# lengths: {source}; {a.batches} batches of {a.batch} samples "
          f"({min(tokens):,}-{max(tokens):,} tokens), {h} heads of {d}, {a.threads} thread(s)")
    print(f"{'path':<22}{'forward ms':>12}{'fwd+bwd ms':>12}")
    med = {key: statistics.median(v) for key, v in times.items()}
    for by_hand, name in ((True, "dense by hand"), (False, "through autograd")):
        print(f"{name:<22}{med[by_hand, 'forward']:>12.1f}{med[by_hand, 'forward+backward']:>12.1f}")
    print(f"{'autograd / by hand':<22}{med[False, 'forward'] / med[True, 'forward']:>11.2f}x"
          f"{med[False, 'forward+backward'] / med[True, 'forward+backward']:>11.2f}x")


if __name__ == "__main__":
    main()
