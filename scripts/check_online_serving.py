"""Does the served model recommend what the stream measured? Asks an exported online model
(``python -m hstu.export --ckpt <online checkpoint> --out ART``) for each user of the stream's
last partitions, with the raw ids of the user's events before them, and scores its top-K
against the user's first event there; prints that hit rate beside the stream's own
prequential HR@K over the same partitions (metrics.csv of the run).

    python scripts/check_online_serving.py --stream tmp_data/ml-100k-weekly --run runs/<run> \
        --model ART [--last 4] [--top-k 10]

The model was trained on those partitions too (it is the end of the stream), so a hit rate
well above the stream's says that; one well below says the artifact does not serve what was
trained (ids mapped wrongly, a corpus that differs).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv


def read_partition(folder: Path) -> pa.Table:
    parts = sorted(p for p in folder.iterdir() if p.suffix == ".csv" and not p.name.startswith(("_", ".")))
    tables = [pacsv.read_csv(p) for p in parts]
    table = pa.concat_tables(tables)
    order = np.argsort(table.column("timestamp").to_numpy(), kind="stable")
    return table.take(pa.array(order))


def stream_hr(run: Path, windows: int, metric: str) -> tuple[float, float]:
    """(eval_events-weighted mean of ``metric`` over the last ``windows`` windows, events)."""
    from hstu.training.report import stream_windows

    last = [g for g in stream_windows(str(run)) if g.get("eval_events", 0) > 0][-windows:]
    n = sum(g["eval_events"] for g in last)
    return sum(g[metric] * g["eval_events"] for g in last) / n, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stream", required=True, help="the stream folder (CSV part files)")
    ap.add_argument("--run", required=True, help="the online run's folder (metrics.csv)")
    ap.add_argument("--model", required=True, help="the exported artifact")
    ap.add_argument("--last", type=int, default=4, help="the stream's last partitions asked about")
    ap.add_argument("--top-k", type=int, default=10)
    a = ap.parse_args(argv)
    partitions = sorted(p for p in Path(a.stream).iterdir()
                        if p.is_dir() and not p.name.startswith(("_", ".")))
    before = [read_partition(p) for p in partitions[: -a.last]]
    after = pa.concat_tables([read_partition(p) for p in partitions[-a.last:]])
    history = pa.concat_tables(before)
    users = history.column("user_id").to_numpy()
    first_after: dict[int, int] = {}
    for u, i in zip(after.column("user_id").to_numpy(), after.column("item_id").to_numpy()):
        first_after.setdefault(int(u), int(i))
    asked = [u for u in first_after if (users == u).any()]
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "events.csv"
        keep = np.isin(users, asked)
        pacsv.write_csv(history.filter(pa.array(keep)).select(["user_id", "item_id", "timestamp"]),
                        events)
        out = Path(tmp) / "top.csv"
        subprocess.run([sys.executable, "-m", "hstu.recommend", "--model", a.model, "--input",
                        str(events), "--top-k", str(a.top_k), "--out", str(out), "--no-aoti"],
                       check=True)
        top: dict[int, list[int]] = {}
        with open(out, newline="") as fh:
            for r in csv.DictReader(fh):
                top.setdefault(int(r["user_id"]), []).append(int(r["item_id"]))
    hits = [first_after[u] in top.get(u, []) for u in asked]
    rate = float(np.mean(hits)) if hits else float("nan")
    metric = f"HR@{a.top_k}"
    stream, n = stream_hr(Path(a.run), a.last, metric)
    spread = 1.96 * np.sqrt(max(rate * (1 - rate), 1e-12) / max(len(hits), 1))
    print(f"served model, {len(hits)} users of the last {a.last} partitions, first event there: "
          f"{metric} {rate:.4f} (+-{spread:.4f}, 95%); the stream's prequential {metric} over "
          f"those partitions ({n:.0f} events): {stream:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
