#!/usr/bin/env python
"""Costs of online training's data side (prints figures; not a test; docs/online.md "Costs").

    .venv/bin/python scripts/bench_stream.py                    # 5M events, 4.35M item ids
    .venv/bin/python scripts/bench_stream.py --events 1000000   # smaller

Three figures, each in process CPU time (the host may be shared: CPU time is what this
process spent, wall time is what others left it):

- id maps: events/s of mapping raw user and item ids to dense ids, windows of --window events,
  item ids drawn uniformly from --items distinct values (KuaiRand-1K's 4.35M by default) and
  user ids from 1M, so the maps grow through the whole run;
- folder: events/s of FolderStream reading CSV partitions of --partition events each (parse,
  checks, content hash, id maps), over --folder-events events;
- user store: events/s of UserStore.append with max_sequence_length 200, over
  --store-events events of --store-users users (each comes back about ten times), and the
  peak resident set of the process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hstu.data.stream import SUCCESS, FolderStream, IdMap
from hstu.data.user_store import UserStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--items", type=int, default=4_350_000)
    parser.add_argument("--window", type=int, default=50_000)
    parser.add_argument("--partition", type=int, default=100_000)
    parser.add_argument("--folder-events", type=int, default=1_000_000)
    parser.add_argument("--store-events", type=int, default=1_000_000)
    parser.add_argument("--store-users", type=int, default=100_000)
    ns = parser.parse_args()
    rng = np.random.default_rng(0)
    items = rng.integers(1, ns.items + 1, ns.events) * 7 + 11  # not dense: as raw ids are
    users = rng.integers(1, 1_000_001, ns.events)

    user_map, item_map = IdMap("user"), IdMap("item")
    t0 = time.process_time()
    for a in range(0, ns.events, ns.window):
        user_map.map(users[a : a + ns.window])
        item_map.map(items[a : a + ns.window])
    cpu = time.process_time() - t0
    print(f"id maps: {ns.events:,} events in {cpu:.1f} s CPU = {ns.events / cpu / 1e6:.2f} M events/s "
          f"({len(user_map):,} users, {len(item_map):,} items)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "stream"
        n = min(ns.folder_events, ns.events)
        for k, a in enumerate(range(0, n, ns.partition)):
            b = min(a + ns.partition, n)
            part = root / f"p{k:05d}"
            part.mkdir(parents=True)
            ts = np.arange(a, b)
            lines = "\n".join(f"{u},{i},{t},4" for u, i, t in zip(users[a:b], items[a:b], ts))
            (part / "part-0000.csv").write_text("user_id,item_id,timestamp,rating\n" + lines + "\n")
            (part / SUCCESS).write_text("")
        t0 = time.process_time()
        got = sum(w.num_events for w in FolderStream(root).windows())
        cpu = time.process_time() - t0
        print(f"folder: {got:,} events in {cpu:.1f} s CPU = {got / cpu / 1e6:.2f} M events/s "
              f"(CSV partitions of {ns.partition:,})")

        store = UserStore(Path(tmp) / "store.sqlite", 200)
        n = min(ns.store_events, ns.events)
        store_users = rng.integers(1, ns.store_users + 1, n)
        t0 = time.process_time()
        for a in range(0, n, ns.window):
            b = min(a + ns.window, n)
            store.append_events(store_users[a:b], items[a:b], np.arange(a, b))
        cpu = time.process_time() - t0
        print(f"user store: {n:,} events in {cpu:.1f} s CPU = {n / cpu / 1e3:.0f} k events/s "
              f"({store.num_users():,} users, file {(Path(tmp) / 'store.sqlite').stat().st_size >> 20} MiB)")
        store.close()
    print(f"peak resident set: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB")


if __name__ == "__main__":
    main()
