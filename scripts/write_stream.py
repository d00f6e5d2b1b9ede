"""Writes a finished dataset as a stream folder, the way Spark or Flink lay one out: one folder
per period, each holding several part files (every file in time order, the files' times
interleaved) and a _SUCCESS marker. For rehearsing online training on a real stream layout
(docs/online.md "The stream folder").

    python scripts/write_stream.py --dataset ml-100k --raw /data/ml-100k --out tmp_data/ml-100k-weekly
    python scripts/write_stream.py --dataset ml-100k --raw /data/ml-100k --out events \
        --period day --parts 4 --format parquet

Partitions are named by the UTC start of their period (``1997-09-15`` for weeks starting on
Monday, days, or ``1997-09-20T05`` for hours), so name order is time order. Event i of a
partition (in time order, ties in the source's order) goes to part file ``i % parts``. Columns:
user_id, item_id, timestamp (seconds), rating (a built-in dataset's action as preprocessing
gives it: MovieLens stars 1..5 as 0..4).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hstu.data.stream.replay import events_of_dataset

_PERIODS = {"week": 7 * 86400, "day": 86400, "hour": 3600}
_MONDAY = 4 * 86400  # 1970-01-01 was a Thursday: weeks start 4 days later


def partition_names(seconds: np.ndarray, period: str) -> np.ndarray:
    """The partition name of each event time (int64 seconds, UTC)."""
    width = _PERIODS[period]
    shift = _MONDAY if period == "week" else 0
    starts = (seconds - shift) // width * width + shift
    fmt = "%Y-%m-%dT%H" if period == "hour" else "%Y-%m-%d"
    names = {int(s): datetime.fromtimestamp(int(s), tz=timezone.utc).strftime(fmt)
             for s in np.unique(starts)}
    return np.array([names[int(s)] for s in starts])


def write_stream(dataset: str, raw: str, out: str | Path, period: str = "week", parts: int = 2,
                 fmt: str = "csv") -> dict[str, int]:
    """Writes the stream folder ``out``; returns {partition: events}."""
    events = events_of_dataset(dataset, raw)
    order = np.argsort(events.timestamp, kind="stable")
    user, item = events.user[order], events.item[order]
    seconds = events.timestamp[order].astype(np.int64)
    rating = None if events.rating is None else events.rating[order]
    names = partition_names(seconds, period)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    bounds = np.flatnonzero(names[1:] != names[:-1]) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(names)]):
        folder = out / str(names[a])
        folder.mkdir(exist_ok=True)
        for p in range(parts):
            rows = np.arange(a + p, b, parts)
            cols = {"user_id": user[rows], "item_id": item[rows], "timestamp": seconds[rows]}
            if rating is not None:
                cols["rating"] = rating[rows].astype(np.int64)
            name = folder / f"part-{p:05d}.{fmt}"
            if fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table(cols), name)
            else:
                with open(name, "w") as fh:
                    fh.write(",".join(cols) + "\n")
                    fh.writelines(",".join(str(v) for v in values) + "\n" for values in zip(*cols.values()))
        (folder / "_SUCCESS").touch()
        written[folder.name] = int(b - a)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="a built-in dataset, e.g. ml-100k")
    parser.add_argument("--raw", required=True, help="its raw archive or folder")
    parser.add_argument("--out", required=True, help="the stream folder to write")
    parser.add_argument("--period", choices=sorted(_PERIODS), default="week")
    parser.add_argument("--parts", type=int, default=2, help="part files per partition")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    args = parser.parse_args(argv)
    if args.parts < 1:
        parser.error("--parts must be >= 1")
    written = write_stream(args.dataset, args.raw, args.out, args.period, args.parts, args.format)
    print(f"wrote {len(written)} partitions of {args.parts} part files, "
          f"{sum(written.values())} events, into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
