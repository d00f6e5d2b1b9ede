"""Decoding semantic ids with and without a cache (one CPU process):

    .venv/bin/python scripts/bench_sid_decode.py [--history 200] [--users 32] [--beam 20]
        [--items 5000] [--codes 64,64,16] [--layers 2] [--width 50] [--reps 3]

The same beam search (hstu.model.sid_decode) over the same random catalogue and the same
random model (an HSTU encoder of ``--layers`` x ``--width``, the ML-100K preset's shape, and
hstu.model.sid's code decoder) two ways: (a) cached, as the trainer and recommendations
decode: each user's history runs through the encoder once and each level runs one decoder
token per beam row against the cached keys and values; (b) without any cache: every level
runs the encoder over the history again for every beam row, and the decoder over the whole
prefix. Checks that both return the same items and scores, then prints the times, their ratio
and a JSON line. docs/performance.md "What to expect on a CPU" has figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hstu.model.builder import build_block
from hstu.model.sid import CachedDecoder, CodeDecoder, RecomputingDecoder
from hstu.model.sid_decode import CodeTrie, beam_search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--history", type=int, default=200, help="items per user's history")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--items", type=int, default=5000, help="catalogue size")
    p.add_argument("--codes", default="64,64,16", help="codes per level, comma-separated")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (the best is kept)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    num_codes = [int(k) for k in a.codes.split(",")]
    grid = 1
    for k in num_codes:
        grid *= k
    if a.items > grid:
        raise SystemExit(f"--items {a.items}: more than the {grid} code sequences of --codes")
    flat = torch.randperm(grid)[: a.items]
    codes = torch.stack([flat // int(torch.tensor(num_codes[i + 1:]).prod()) % k
                         for i, k in enumerate(num_codes)], 1)
    trie = CodeTrie(codes, num_codes)
    net = SimpleNamespace(num_layers=a.layers, hidden_size=a.width, num_attention_heads=1,
                          kv_channels=a.width, num_position_buckets=512, is_causal=True,
                          hidden_dropout=0.0)
    block = build_block(net, a.history).eval()
    decoder = CodeDecoder(a.width, num_codes, 1, 2).eval()
    with torch.no_grad():
        for head in decoder.heads:  # a spread of scores, as a trained head has
            head.weight.mul_(10)
    histories = torch.randn(a.users, a.history, a.width)
    ts = torch.arange(a.history, dtype=torch.int64).repeat(a.users) * 60

    def encode(users: torch.Tensor) -> torch.Tensor:
        """The state of each given user's last history token [N, D] (the encoder's query)."""
        n = users.numel()
        x = histories[users].reshape(n * a.history, a.width)
        offsets = torch.arange(n + 1, dtype=torch.int64) * a.history
        zeros = torch.zeros(n, dtype=torch.int64)
        out = block(x, offsets, a.history, zeros, zeros, ts[: n * a.history])
        return out[offsets[1:] - 1]

    all_users = torch.arange(a.users)

    def cached():
        return beam_search(CachedDecoder(decoder, encode(all_users)), trie, a.users, a.beam,
                           a.top_k)

    def recomputed():
        return beam_search(RecomputingDecoder(decoder, histories[:, 0], encode=encode), trie,
                           a.users, a.beam, a.top_k)

    times = {}
    results = {}
    with torch.no_grad():
        for name, fn in (("cached", cached), ("no_cache", recomputed)):
            best = float("inf")
            for _ in range(a.reps):
                start = time.perf_counter()
                results[name] = fn()
                best = min(best, time.perf_counter() - start)
            times[name] = best
    same_items = torch.equal(results["cached"].items, results["no_cache"].items)
    diff = (results["cached"].scores - results["no_cache"].scores).abs().max().item()
    ratio = times["no_cache"] / times["cached"]
    print(f"{a.users} users, history {a.history}, beam {a.beam}, top {a.top_k}, "
          f"{a.items} items, codes {num_codes}, encoder {a.layers} x {a.width}, "
          f"{a.threads} thread(s)")
    print(f"  cached   {times['cached'] * 1e3:9.1f} ms  ({times['cached'] / a.users * 1e3:.2f} "
          "ms a user)")
    print(f"  no cache {times['no_cache'] * 1e3:9.1f} ms  "
          f"({times['no_cache'] / a.users * 1e3:.2f} ms a user)")
    print(f"  ratio {ratio:.1f}x; same items: {same_items}; largest score difference {diff:.2e}")
    print(json.dumps({"users": a.users, "history": a.history, "beam": a.beam,
                      "cached_s": times["cached"], "no_cache_s": times["no_cache"],
                      "ratio": ratio, "same_items": same_items, "max_score_diff": diff}))
    if not same_items:
        raise SystemExit("the cached decoding returned other items than the uncached one")


if __name__ == "__main__":
    main()
