"""Ranking inference with a cached history vs the full forward (one CPU process):

    .venv/bin/python scripts/bench_kv_cache.py [--history 200] [--candidates 10] [--users 1] [--reps 20]
    .venv/bin/python scripts/bench_kv_cache.py --artifact ARTIFACT   # an exported ranking model

Times, for the same users and candidates, (a) the full forward over history + candidates
(every layer re-encodes the history: O((history + K)^2)), and (b) scoring the K new
candidates against the history's cached per-layer keys and values (O(K x history)); the
history is encoded once beforehand (its cost is printed too, it is paid once per user, not
per request). Checks that both give the same scores, then prints the speed ratio and a JSON
line. Without --artifact the model is the ML-100K ranking preset's shape (2 layers, width 64,
2 heads of 32, action tokens, 5-class head) with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hstu.serving.model import InferenceHSTU


def preset_config(history: int, candidates: int) -> dict:
    """configs/ml-100k_ranking.gin's dense shape (no contextual features, to stay small)."""
    max_items = history + candidates
    return {
        "task": "ranking", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "head_dim": 32, "alpha": 32 ** -0.5,
        "scaling_seqlen": 2 * max_items, "norm_eps": 1e-5, "norm_affine": True, "uvqk_bias": True, "output_bias": False,
        "is_causal": True, "mask_convention": "hstu", "target_group_size": 1, "num_position_buckets": 512, "use_position_embedding": True,
        "relative_attention_bias": False, "rab_num_positions": 0, "rab_use_time": False, "num_contextual": 0,
        "has_action": True, "projections": {}, "item_feature_name": "item_id", "action_feature_name": "action",
        "contextual_feature_names": [], "head_arch": [128, 5], "head_bias": True, "head_activation": "relu",
        "num_tasks": 1, "feature_dims": {"item_id": 64, "action": 64}, "max_item_seqlen": max_items,
    }


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def run(model: InferenceHSTU, history: int, candidates: int, users: int, reps: int) -> dict:
    cfg = model.cfg
    torch.manual_seed(0)
    dims = cfg["feature_dims"]
    slots = history + candidates
    items = torch.randn(users, slots, dims[cfg["item_feature_name"]]) * 0.1
    lengths = torch.full((users,), slots, dtype=torch.int64)
    num_c = torch.full((users,), candidates, dtype=torch.int64)
    uses_time = cfg["relative_attention_bias"] and cfg["rab_use_time"]
    ts = torch.cumsum(torch.randint(1, 5000, (users, slots)), 1) if uses_time else None
    acts = torch.randn(users, slots, dims[cfg["action_feature_name"]]) * 0.1 if cfg["has_action"] else None
    names = cfg["contextual_feature_names"]
    ctx = torch.randn(users, len(names), dims[names[0]]) * 0.1 if names else None
    hist_len = torch.full((users,), history, dtype=torch.int64)

    def full():
        return model(items, lengths, num_c, ts, acts, ctx)

    def encode():
        return model.encode_history(
            items[:, :history], hist_len, None if ts is None else ts[:, :history],
            None if acts is None else acts[:, :history], ctx, None if ts is None else ts[:, history],
        )

    cache = encode()

    def cached():
        return model.score_candidates(*cache, items[:, history:], num_c, None if ts is None else ts[:, history:])

    diff = float((full()[:, history:] - cached()).abs().max())
    t_full, t_cached, t_encode = _time(full, reps), _time(cached, reps), _time(encode, max(3, reps // 4))
    return {"history": history, "candidates": candidates, "users": users, "threads": torch.get_num_threads(),
            "full_forward_ms": 1e3 * t_full, "cached_ms": 1e3 * t_cached, "encode_history_ms": 1e3 * t_encode,
            "speedup": t_full / t_cached, "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--artifact", default=None, help="an exported ranking artifact instead of random weights")
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    if ns.artifact:
        from hstu.serving.artifact import Artifact

        model = Artifact(ns.artifact).eager_model()
        if model.cfg["task"] != "ranking":
            print("error: the cached history is for ranking models", file=sys.stderr)
            return 2
    else:
        torch.manual_seed(0)
        model = InferenceHSTU(preset_config(ns.history, ns.candidates)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    r = run(model, ns.history, ns.candidates, ns.users, ns.reps)
    print(f"{ns.candidates} candidates after a {ns.history}-item history, {ns.users} user(s), "
          f"{r['threads']} thread(s): full forward {r['full_forward_ms']:.2f} ms, cached history "
          f"{r['cached_ms']:.2f} ms -> {r['speedup']:.1f}x faster (history encoded once: "
          f"{r['encode_history_ms']:.2f} ms); max |diff| {r['max_abs_diff']:.1e}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
