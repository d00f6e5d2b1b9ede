#!/usr/bin/env python
"""Two CPU pieces of a retrieval step, each against what it replaced (prints figures; not a test).

    .venv/bin/python scripts/bench_loss_pieces.py                  # the ML-100K preset's shapes
    .venv/bin/python scripts/bench_loss_pieces.py --items 10000 --queries 3000

- The full-corpus loss (``full_softmax_loss``, forward + backward, float32) with each query's
  history left out (RetrievalArgs.exclude_history_from_loss): the CPU's way, the history's
  (query, column) pairs listed 8 blocks of logits at a time (``HistoryWindow._mask_pairs_``),
  against the fixed-size window a block at a time (``_mask_window_``, what other devices run);
  and the loss without the mask.
- Dropout (``hstu.ops.dropout``, forward + backward) on a [queries, 3 x dim] activation (the
  preset's ``LayerNorm(O) * U``), against ``torch.nn.functional.dropout``.

Histories: each user's of the preprocessed ML-100K (tmp_data/ml-100k) capped at
``--max-len``, users drawn until ``--queries`` queries (one per item but the first); without
that folder a log-normal mix of the same mean. The variants alternate, so a busy host slows
them alike; figures are medians per call, one CPU thread unless --threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_attention_paths import history_lengths  # the same histories (scripts/ is on the path)

import hstu.ops.losses.full_corpus as fc
from hstu.ops.dropout import dropout
from hstu.ops.losses.full_corpus import HistoryWindow, full_softmax_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--queries", type=int, default=6000, help="about one rank's queries a step")
    p.add_argument("--items", type=int, default=1682)
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lengths, source = history_lengths(a.max_len, 0)
    g = torch.Generator().manual_seed(0)
    picked: list[int] = []
    while sum(n - 1 for n in picked) < a.queries:
        picked.append(lengths[int(torch.randint(0, len(lengths), (1,), generator=g))])
    hist = torch.tensor(picked)
    queries_per = hist - 1
    num_q = int(queries_per.sum())
    item_starts = torch.cat([torch.zeros(1, dtype=torch.int64), hist.cumsum(0)[:-1]])
    seg = torch.repeat_interleave(torch.arange(len(picked)), queries_per)
    index = torch.arange(num_q) - torch.repeat_interleave(
        queries_per.cumsum(0) - queries_per, queries_per)
    ids = torch.randint(0, a.items, (int(hist.sum()),), generator=g)
    target = ids[item_starts[seg] + index + 1]
    window = HistoryWindow(ids, item_starts[seg], index + 1, a.max_len - 1)
    queries = F.normalize(torch.randn(num_q, a.dim, generator=g), dim=1) / 0.1
    corpus = F.normalize(torch.randn(a.items, a.dim, generator=g), dim=1)
    pairs = int(window.lengths.sum())

    def loss(mask: str) -> None:
        q = queries.clone().requires_grad_()
        c = corpus.clone().requires_grad_()
        total, _ = full_softmax_loss(q, c, target, None, None if mask == "none" else window)
        total.backward()

    activation = torch.randn(num_q, 3 * a.dim, generator=g, requires_grad=True)
    upstream = torch.randn(num_q, 3 * a.dim, generator=g)

    def drop(ours: bool) -> None:
        out = dropout(activation, 0.5) if ours else F.dropout(activation, 0.5, True)
        out.backward(upstream)

    pairs_mask, window_mask = HistoryWindow.mask_, HistoryWindow._mask_window_
    blocks = fc._MASKED_BLOCKS
    cases = {
        "loss, history as pairs (CPU)": lambda: loss("pairs"),
        "loss, history as a window": lambda: loss("window"),
        "loss, no history mask": lambda: loss("none"),
        "dropout, 16-bit masks": lambda: drop(True),
        "dropout, torch's": lambda: drop(False),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.repeats):
        for name, run in cases.items():
            windowed = "window" in name
            HistoryWindow.mask_ = window_mask if windowed else pairs_mask
            fc._MASKED_BLOCKS = 1 if windowed else blocks
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) * 1e3)
    HistoryWindow.mask_, fc._MASKED_BLOCKS = pairs_mask, blocks
    print(f"# histories: {source}; {len(picked)} users, {num_q:,} queries, {pairs:,} history "
          f"pairs, {a.items:,} items, dim {a.dim}, {a.threads} thread(s)")
    print(f"{'forward + backward':<32}{'ms':>8}")
    for name, values in times.items():
        print(f"{name:<32}{statistics.median(values):>8.1f}")


if __name__ == "__main__":
    main()
