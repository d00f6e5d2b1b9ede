"""Retrieval training loss (uniform negatives) vs catalogue size: forward + backward of the
negative scores, the way the loss computed them before (dense [Q, U] scores and a gather, or
gathered [Q, M, D] vectors when U is large) and now (``shared_row_scores``: sampled sparse
kernels on CPU). Q queries and M negatives per query as one step of the ML-1M paper recipe
on ML-100K (Q ~ 12k, M = 128, D = 50).

    python scripts/bench_retrieval_loss.py [--queries 12000] [--negatives 128] [--dim 50]

``--full-corpus``: the exact softmax over every item instead (``negative_sampling =
"full_corpus"``), as autograd builds it (``F.cross_entropy(q @ corpus.T)``) against the fused
blocked loss (``hstu.ops.losses.full_softmax_loss``), one query per training position
of a rank's ML-100K preset batch (Q ~ 6,700):

    python scripts/bench_retrieval_loss.py --full-corpus --queries 6700 --catalogues 1683 10092 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hstu.ops.losses import full_softmax_loss, shared_row_scores


def _before(queries, rows, index):
    """The previous rule: [Q, U] scores when U * 2 <= M * D, else rows[index] [Q, M, D]."""
    if rows.shape[0] * 2 <= index.shape[1] * rows.shape[1]:
        return (queries @ rows.t()).gather(1, index)
    return torch.einsum("qd,qmd->qm", queries, rows[index])


def _time(fn, queries, rows, index, grad, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        q = queries.detach().requires_grad_()
        r = rows.detach().requires_grad_()
        t0 = time.perf_counter()
        fn(q, r, index).backward(grad)
        best = min(best, time.perf_counter() - t0)
    return best


def _full_corpus(a) -> None:
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"Q={a.queries} D={a.dim}, {torch.get_num_threads()} threads; ms per forward + "
          f"backward of the full-corpus softmax loss (best of {a.repeats}, each a new step)")
    for items in a.catalogues:
        queries = F.normalize(torch.randn(a.queries, a.dim, generator=g), dim=-1) / 0.05
        corpus = F.normalize(torch.randn(items, a.dim, generator=g), dim=-1)
        target = torch.randint(0, items, (a.queries,), generator=g)
        times = {}
        for name, fn in (
            ("autograd", lambda q, c, t=target: F.cross_entropy(q @ c.t(), t, reduction="sum")),
            ("fused", lambda q, c, t=target: full_softmax_loss(q, c, t)[0]),
        ):
            best = float("inf")
            for _ in range(a.repeats + 1):  # the first call of the fused loss allocates its buffer
                q = queries.detach().requires_grad_()
                c = corpus.detach().requires_grad_()
                t0 = time.perf_counter()
                fn(q, c).backward()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
        results.append({"items": items, "autograd_ms": times["autograd"] * 1e3,
                        "fused_ms": times["fused"] * 1e3})
        print(f"  {items:>7,} items: autograd {times['autograd'] * 1e3:8.1f} ms   fused "
              f"{times['fused'] * 1e3:7.1f} ms   {times['autograd'] / times['fused']:5.1f}x")
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=12000)
    ap.add_argument("--negatives", type=int, default=128)
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--catalogues", type=int, nargs="*", default=[1682, 10000, 100000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-corpus", action="store_true", help="the exact softmax loss instead")
    a = ap.parse_args()
    if a.full_corpus:
        _full_corpus(a)
        return
    g = torch.Generator().manual_seed(0)
    results = []
    print(f"Q={a.queries} M={a.negatives} D={a.dim}, {torch.get_num_threads()} threads; "
          "ms per forward + backward of the negative scores (best of "
          f"{a.repeats})")
    for items in a.catalogues:
        queries = F.normalize(torch.randn(a.queries, a.dim, generator=g), dim=-1)
        ids = torch.randint(0, items, (a.queries, a.negatives), generator=g)
        uniq, index = torch.unique(ids, return_inverse=True)
        rows = F.normalize(torch.randn(uniq.numel(), a.dim, generator=g), dim=-1)
        grad = torch.randn(a.queries, a.negatives, generator=g)
        before = _time(_before, queries, rows, index, grad, a.repeats)
        after = _time(shared_row_scores, queries, rows, index, grad, a.repeats)
        results.append({"items": items, "distinct_negatives": uniq.numel(),
                        "before_ms": before * 1e3, "after_ms": after * 1e3})
        print(f"  {items:>7,} items ({uniq.numel():>6,} distinct negatives): "
              f"before {before * 1e3:8.1f} ms   after {after * 1e3:7.1f} ms   "
              f"{before / after:5.1f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
