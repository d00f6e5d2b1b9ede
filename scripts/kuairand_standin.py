"""A random stand-in for KuaiRand-1K in its raw layout, for speed runs without the archive.

    .venv/bin/python scripts/kuairand_standin.py --out /tmp/kuairand-1k-raw \
        [--users 1000] [--items 4369953] [--interactions 11713045] [--seed 0]
    python -m hstu.data.preprocess --dataset kuairand-1k --raw /tmp/kuairand-1k-raw --out tmp_data/standin

writes ``log_standard_4_08_to_4_21_1k.csv`` (user_id, video_id, time_ms and the eight
feedback flags the reader takes; the official file has more columns, which the reader
ignores) and ``user_features_1k.csv`` (user_id and the four range columns). The defaults are
KuaiRand-1K's published size (1,000 users, 4,369,953 videos, 11,713,045 standard-log
interactions). Nothing in it is learnable: history lengths are log-normal around the mean
(every user at least --min-length), every video once and the rest Zipf-like, flags independent
coin flips at fixed rates. It measures cost (step time, memory), never quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

# flag -> rate of 1s (fixed, roughly click-through-like; not KuaiRand's measured rates)
FLAG_RATES = {
    "is_click": 0.3, "is_like": 0.02, "is_follow": 0.002, "is_comment": 0.003,
    "is_forward": 0.001, "is_hate": 0.001, "long_view": 0.2, "is_profile_enter": 0.01,
}
RANGES = ("follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
          "register_days_range")


def lengths_of(users: int, total: int, min_length: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [users] >= min_length summing to total (log-normal shares of the rest)."""
    rest = total - users * min_length
    if rest < 0:
        raise SystemExit(f"error: --interactions {total} < --users {users} x --min-length {min_length}")
    share = rng.lognormal(0.0, 1.0, size=users)
    extra = np.floor(share / share.sum() * rest).astype(np.int64)
    extra[: rest - int(extra.sum())] += 1
    return min_length + extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/kuairand_standin.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=4_369_953)
    p.add_argument("--interactions", type=int, default=11_713_045)
    p.add_argument("--min-length", type=int, default=4_200, help="shortest history (default: 4,096 + 100 + 4)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    lengths = lengths_of(a.users, a.interactions, a.min_length, rng)
    n = int(lengths.sum())
    user = np.repeat(np.arange(a.users, dtype=np.int64), lengths)
    # every video once (the preprocessor's item table = the distinct videos, as in the real
    # data where most videos are seen once or twice), the rest Zipf-like; then shuffled
    if n < a.items:
        raise SystemExit(f"error: --interactions {n} < --items {a.items}: every video must occur")
    ranks = np.minimum(rng.pareto(0.8, size=n - a.items).astype(np.int64), a.items - 1)
    video = rng.permutation(np.concatenate([np.arange(a.items), rng.permutation(a.items)[ranks]]))
    start = np.repeat(1_649_376_000_000 + rng.integers(0, 86_400_000, size=a.users), lengths)
    within = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    time_ms = start + within * 60_000 + rng.integers(0, 30_000, size=n)
    cols = {"user_id": user, "video_id": video, "time_ms": time_ms}
    for name, rate in FLAG_RATES.items():
        cols[name] = (rng.random(n) < rate).astype(np.int8)
    a.out.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(pa.table(cols), a.out / "log_standard_4_08_to_4_21_1k.csv")
    users = {"user_id": np.arange(a.users)}
    for name in RANGES:
        users[name] = pa.array([f"{lo}-{lo + 9}" for lo in rng.integers(0, 5, size=a.users) * 10])
    pacsv.write_csv(pa.table(users), a.out / "user_features_1k.csv")
    print(f"wrote {a.out}: {a.users} users, {n} interactions, {len(np.unique(video))} distinct of "
          f"{a.items} videos, history {lengths.min()}..{lengths.max()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
