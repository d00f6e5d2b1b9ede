"""Interactions with equal timestamps keep their file order (docs/data.md "Order (ties in time)").

For each built-in layout a small raw file is written here whose ties are in file order that
differs from item-id order (so an unstable sort, or one that breaks ties by item id, fails);
the preprocessed sequences must equal a stable per-user sort written in the test. The real
MovieLens-100K (../shared/data/ml-100k, skipped with a reason when absent) is checked whole.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hstu.data.data_args import CustomDataArgs
from hstu.data.preprocess import BYTES_PER_ROW, preprocess
from hstu.data.store import SequenceStore
from tests.data.helpers import (
    KUAIRAND_LOG_HEADER,
    KUAIRAND_USER_HEADER,
    kuairand_row,
    lines,
    write_tar_gz,
    write_zip,
)

# (user, item, rating, time): user 1 rates 9, 3, 7 in one second (id order would be 3, 7, 9),
# then 8 and 2 in a later one; user 2's tie (5 then 1) is split by user 1's rows; user 3 has
# one earlier rating and a tie after it. Rows are deliberately not grouped by user.
EVENTS = [
    (2, 5, 4, 300),
    (1, 9, 5, 100),
    (1, 3, 1, 100),
    (3, 4, 2, 50),
    (2, 1, 3, 300),
    (1, 7, 2, 100),
    (1, 8, 4, 200),
    (3, 6, 5, 60),
    (1, 2, 3, 200),
    (3, 2, 1, 60),
    (2, 6, 2, 250),
]


def stable_reference(events) -> dict:
    """raw user -> raw items sorted by time, ties in file order (Python's sort is stable)."""
    per_user = defaultdict(list)
    for user, item, _rating, time in events:
        per_user[user].append((time, item))
    out = {}
    for user, rows in per_user.items():
        out[user] = [item for _, item in sorted(rows, key=lambda r: r[0])]
    return out


def raw_sequences(folder: Path) -> dict:
    """raw user -> raw item ids of the preprocessed output, in stored order."""
    seq = pq.read_table(folder / "sequences.parquet").to_pydict()
    item_map = pq.read_table(folder / "item_map.parquet").to_pydict()
    raw = dict(zip(item_map["item_id"], item_map["raw_item_id"]))
    return {u: [raw[i] for i in items] for u, items in zip(seq["raw_user_id"], seq["item_ids"])}


def test_reference_is_not_item_id_order():
    """The fixture can fail: breaking ties by item id gives other sequences."""
    by_id = defaultdict(list)
    for user, item, _rating, time in sorted(EVENTS, key=lambda e: (e[0], e[3], e[1])):
        by_id[user].append(item)
    ref = stable_reference(EVENTS)
    assert ref[1] == [9, 3, 7, 8, 2] and by_id[1] == [3, 7, 9, 2, 8]
    assert all(ref[u] != by_id[u] for u in (1, 2, 3))


@pytest.mark.parametrize("memory_gb", [None, 4 * BYTES_PER_ROW / 2**30])
def test_ml_100k_layout_keeps_file_order(tmp_path, memory_gb):
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    (raw / "u.data").write_text(lines([f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in EVENTS]))
    (raw / "u.user").write_text(
        lines(["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067"])
    )
    kwargs = {} if memory_gb is None else {"memory_gb": memory_gb}  # several partitions
    preprocess("ml-100k", raw, tmp_path / "out", verbose=False, **kwargs)
    assert raw_sequences(tmp_path / "out" / "ml-100k") == stable_reference(EVENTS)


def test_ml_1m_layout_keeps_file_order(tmp_path):
    archive = write_zip(
        tmp_path / "ml-1m.zip",
        {
            "ml-1m/ratings.dat": lines([f"{u}::{i}::{r}::{t}" for u, i, r, t in EVENTS]),
            "ml-1m/users.dat": lines(
                ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]
            ),
        },
    )
    preprocess("ml-1m", archive, tmp_path / "out", verbose=False)
    assert raw_sequences(tmp_path / "out" / "ml-1m") == stable_reference(EVENTS)


def test_ml_20m_layout_keeps_file_order(tmp_path):
    rows = ["userId,movieId,rating,timestamp"] + [
        f"{u},{i},{r - 0.5 if i % 2 else r:.1f},{t}" for u, i, r, t in EVENTS  # half stars too
    ]
    archive = write_zip(tmp_path / "ml-20m.zip", {"ml-20m/ratings.csv": lines(rows)})
    preprocess("ml-20m", archive, tmp_path / "out", verbose=False)
    assert raw_sequences(tmp_path / "out" / "ml-20m") == stable_reference(EVENTS)


def test_kuairand_layout_keeps_file_order_across_its_log_files(tmp_path):
    """time_ms is the sort key at full precision (rows in the same second but different
    milliseconds are ordered by their milliseconds); equal time_ms keep file order, the two
    standard logs read in name (date) order."""
    first = [(5, 900, 2000), (6, 300, 1500), (5, 100, 2000), (5, 700, 1999)]
    second = [(6, 100, 1500), (5, 400, 2000), (6, 200, 1000), (6, 50, 1500)]
    top = "KuaiRand-1k/data/"
    archive = write_tar_gz(
        tmp_path / "KuaiRand-1k.tar.gz",
        {
            # written second-file-first: the reader's order is by name, not by archive order
            top + "log_standard_4_22_to_5_08_1k.csv": lines(
                [KUAIRAND_LOG_HEADER, *(kuairand_row(*r) for r in second)]
            ),
            top + "log_standard_4_08_to_4_21_1k.csv": lines(
                [KUAIRAND_LOG_HEADER, *(kuairand_row(*r) for r in first)]
            ),
            top + "user_features_1k.csv": lines(
                [
                    KUAIRAND_USER_HEADER,
                    '5,full_active,0,0,0,3,"(0,10]",1,"[0,10)",2,"[0,5)",100,61-90',
                    '6,high_active,0,0,0,30,"(10,50]",1,"[0,10)",2,"[0,5)",400,365+',
                ]
            ),
        },
    )
    preprocess("kuairand-1k", archive, tmp_path / "out", verbose=False)
    got = raw_sequences(tmp_path / "out" / "kuairand-1k")
    want = stable_reference([(u, v, 0, t) for u, v, t in first + second])
    assert got == want
    assert got == {5: [700, 900, 100, 400], 6: [200, 300, 100, 50]}
    seq = pq.read_table(tmp_path / "out" / "kuairand-1k" / "sequences.parquet").to_pydict()
    assert seq["timestamps"] == [[1, 2, 2, 2], [1, 1, 1, 1]]  # stored in seconds


def test_custom_folder_keeps_file_order_across_files(tmp_path):
    """Own data: a folder's files are read in name order, each in row order."""
    folder = tmp_path / "log"
    folder.mkdir()
    header = "user_id,item_id,rating,timestamp"
    half = len(EVENTS) // 2
    (folder / "b.csv").write_text(
        lines([header, *(f"{u},{i},{r},{t}" for u, i, r, t in EVENTS[half:])])
    )
    (folder / "a.csv").write_text(
        lines([header, *(f"{u},{i},{r},{t}" for u, i, r, t in EVENTS[:half])])
    )
    preprocess("custom", None, tmp_path / "out", custom=CustomDataArgs(path=str(folder)),
               verbose=False)  # fmt: skip
    assert raw_sequences(tmp_path / "out" / "custom") == stable_reference(EVENTS)


# ---------------------------------------------------------------------- real MovieLens-100K

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"
if not REAL.exists():
    REAL = Path("/work/shared/data/ml-100k")


@pytest.mark.skipif(not (REAL / "u.data").exists(), reason=f"real MovieLens-100K not found at {REAL}")
def test_real_ml_100k_is_the_stable_file_order(tmp_path):
    raw = np.loadtxt(REAL / "u.data", dtype=np.int64)  # user, item, rating, time
    user, item, time = raw[:, 0], raw[:, 1], raw[:, 3]
    # ties: interactions sharing (user, second) with another one
    _, inverse, counts = np.unique(user * (1 << 32) + time, return_inverse=True, return_counts=True)
    tied = counts[inverse] > 1
    assert tied.sum() > 50_000 and len(np.unique(user[tied])) == 943  # ties are the rule here
    stable = np.lexsort((time, user))  # np.lexsort is stable: file order within equal keys
    by_id = np.lexsort((item, time, user))
    assert not np.array_equal(item[stable], item[by_id])  # the two orders do differ

    preprocess("ml-100k", REAL, tmp_path, verbose=False)
    store = SequenceStore.load(tmp_path / "ml-100k")
    item_map = pq.read_table(tmp_path / "ml-100k" / "item_map.parquet").to_pydict()
    raw_item = np.zeros(max(item_map["item_id"]) + 1, dtype=np.int64)
    raw_item[item_map["item_id"]] = item_map["raw_item_id"]
    # users are coded 1..943 in raw-id order: the flat store is the (user, time) order
    assert np.array_equal(raw_item[np.asarray(store.items)], item[stable])
    assert np.array_equal(np.asarray(store.timestamps), time[stable])
