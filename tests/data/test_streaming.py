"""Streaming preprocessing (--memory-gb) and the official-layout generator (hstu.data.synthesize).

The grouping runs in user-range partitions spilled to disk; the output must not depend on
how many partitions there are, and must be what a plain per-user sort of the raw rows gives.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from hstu.data.errors import DataError
from hstu.data.parsing import TextFormat, iter_delimited
from hstu.data.preprocess import BYTES_PER_ROW, preprocess
from hstu.data.sources import KUAIRAND_ACTION_BITS
from hstu.data.synthesize import synthesize
from tests.data.helpers import KUAIRAND_LOG_HEADER, KUAIRAND_USER_HEADER, kuairand_row, lines


def _output(folder):
    return (
        pq.read_table(folder / "sequences.parquet"),
        pq.read_table(folder / "item_map.parquet"),
        json.loads((folder / "metadata.json").read_text()),
        pq.ParquetFile(folder / "sequences.parquet").num_row_groups,
    )


def _ml_100k_raw(folder, rng):
    """u.data with many equal timestamps (ties keep file order), a user with one rating
    (dropped) whose item nobody else rated, and u.user."""
    folder.mkdir()
    n = 3000
    user = rng.integers(1, 60, n)
    item = rng.integers(1, 200, n)
    stamp = 880_000_000 + rng.integers(0, 40, n)  # 40 distinct seconds: ties everywhere
    rating = rng.integers(1, 6, n)
    rows = [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in zip(user, item, rating, stamp)]
    rows.append("77\t999\t3\t880000001")  # user 77: one rating, of item 999 only
    (folder / "u.data").write_text(lines(rows))
    ages = rng.integers(7, 70, 80)
    (folder / "u.user").write_text(
        lines([f"{u}|{ages[u]}|{'MF'[u % 2]}|writer|{10000 + u}" for u in range(1, 80)])
    )
    return folder


@pytest.mark.parametrize("dataset", ["ml-100k", "ml-20m", "kuairand-27k"])
def test_memory_budget_does_not_change_the_output(tmp_path, dataset):
    if dataset == "ml-100k":
        raw = _ml_100k_raw(tmp_path / "raw", np.random.default_rng(0))
        rows = 3001
    else:
        fraction = {"ml-20m": 0.0005, "kuairand-27k": 0.0002}[dataset]
        rows = synthesize(dataset, fraction, tmp_path / "raw", seed=3)["interactions"]
    whole = preprocess(dataset, raw if dataset == "ml-100k" else tmp_path / "raw",
                       tmp_path / "whole", verbose=False)  # fmt: skip
    # a budget of about rows / 6 interactions: several partitions, spilled to disk
    budget = rows / 6 * BYTES_PER_ROW / 2**30
    tiny = preprocess(dataset, tmp_path / "raw", tmp_path / "tiny", verbose=False,
                      memory_gb=budget)  # fmt: skip
    a, b = _output(tmp_path / "whole" / dataset), _output(tmp_path / "tiny" / dataset)
    assert a[3] == 1 and b[3] >= 3  # one partition against several (a row group each)
    assert a[0].schema.equals(b[0].schema, check_metadata=True)
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    assert a[2] == b[2] == whole == tiny
    assert whole["num_interactions"] == rows - (1 if dataset == "ml-100k" else 0)
    assert not list((tmp_path / "tiny").glob(".*"))  # the spill went with the temporary folder


def test_partitioned_output_is_the_plain_per_user_sort(tmp_path):
    """Against a reference written here: per user (in raw-id order) the rows sorted by time,
    equal times in file order across both log files; items coded in raw-id order over the
    kept users; a user with one interaction dropped (and the item only they saw)."""
    rng = np.random.default_rng(5)
    raw = tmp_path / "raw"
    raw.mkdir()
    flags = [name for name, _ in KUAIRAND_ACTION_BITS]
    logs, file_rows = {}, []
    for name in ("log_standard_4_08_to_4_21_1k.csv", "log_standard_4_22_to_5_08_1k.csv"):
        body = []
        for _ in range(700):
            user, video = int(rng.integers(0, 40)) * 1000, int(rng.integers(5, 400)) * 3
            time_ms = int(rng.integers(0, 30)) * 1000  # 30 distinct times: many ties
            bits = {f: int(rng.random() < 0.3) for f in flags}
            body.append(kuairand_row(user, video, time_ms, bits))
            file_rows.append((user, video, time_ms, bits))
        logs[name] = body
    logs["log_standard_4_22_to_5_08_1k.csv"].append(kuairand_row(999_999, 7, 5))
    file_rows.append((999_999, 7, 5, dict.fromkeys(flags, 0)))
    for name, body in logs.items():
        (raw / name).write_text(lines([KUAIRAND_LOG_HEADER, *body]))
    users = [f'{u * 1000},full_active,0,0,0,3,"[1,10)",1,"[1,10)",{u % 3},0,100,91-180'
             for u in range(40)]  # fmt: skip
    (raw / "user_features_1k.csv").write_text(lines([KUAIRAND_USER_HEADER, *users]))
    budget = 300 * BYTES_PER_ROW / 2**30  # about 300 interactions a partition
    preprocess("kuairand-1k", raw, tmp_path / "out", verbose=False, memory_gb=budget)
    seq, item_map, meta, groups = _output(tmp_path / "out" / "kuairand-1k")
    assert groups >= 3

    per_user = defaultdict(list)
    for position, (user, video, time_ms, bits) in enumerate(file_rows):
        action = sum(1 << k for k, f in enumerate(flags) if bits[f])
        per_user[user].append((time_ms, position, video, action))
    kept = sorted(u for u, r in per_user.items() if len(r) >= 2)
    videos = sorted({v for u in kept for _, _, v, _ in per_user[u]})
    code = {v: k + 1 for k, v in enumerate(videos)}
    want = []
    for k, user in enumerate(kept):
        history = sorted(per_user[user])  # (time, file position): ties keep file order
        want.append({
            "user_id": k + 1,
            "raw_user_id": user,
            "item_ids": [code[v] for _, _, v, _ in history],
            "timestamps": [t // 1000 for t, _, _, _ in history],
            "actions": [a for _, _, _, a in history],
        })  # fmt: skip
    got = seq.select(["user_id", "raw_user_id", "item_ids", "timestamps", "actions"]).to_pylist()
    assert got == want
    assert item_map.to_pydict() == {"item_id": list(range(1, len(videos) + 1)), "raw_item_id": videos}
    assert meta["dropped_users"] == 1 and 7 not in videos


def test_blocks_name_the_right_line(tmp_path):
    """Streamed in blocks of a few lines each, a bad value far down names its own line."""
    path = tmp_path / "ratings.csv"
    body = [f"{k},{k % 7},3.5,{1000 + k}" for k in range(2000)]
    body[1500] = "1501,3,,1000"  # line 1502 (header is line 1)
    path.write_text(lines(["userId,movieId,rating,timestamp", *body]))
    cols = {"userId": "int", "movieId": "int", "rating": "float", "timestamp": "int"}

    def blocks():
        return iter_delimited(lambda: open(path, "rb"), "ratings.csv", cols,
                              TextFormat(delimiter=",", header=True), block_size=4096)  # fmt: skip

    with pytest.raises(DataError, match=r"ratings\.csv:1502: field rating: empty value"):
        for _ in blocks():
            pass
    body[1500] = "1501,x3,3.5,1000"
    path.write_text(lines(["userId,movieId,rating,timestamp", *body]))
    with pytest.raises(DataError, match=r"ratings\.csv:1502: field movieId: expected an integer"):
        for _ in blocks():
            pass
    body[1500] = "1501,3,3.5,1000"
    path.write_text(lines(["userId,movieId,rating,timestamp", *body]))
    got = list(blocks())
    assert len(got) > 5 and sum(b.num_rows for b in got) == 2000
    assert got[3].locate(0) == ("ratings.csv", 2 + sum(b.num_rows for b in got[:3]))
    assert int(got[3].data["userId"][0]) == sum(b.num_rows for b in got[:3])


def test_memory_budget_must_be_positive(tmp_path):
    raw = _ml_100k_raw(tmp_path / "raw", np.random.default_rng(1))
    with pytest.raises(DataError, match="--memory-gb: 0.0 is not a positive"):
        preprocess("ml-100k", raw, tmp_path / "out", verbose=False, memory_gb=0.0)


# published sizes (users, items, interactions of the standard logs / ratings)
OFFICIAL_SIZES = {
    "kuairand-pure": (27_077, 7_583, 1_436_609),
    "kuairand-1k": (1_000, 4_369_953, 11_713_045),
    "kuairand-27k": (27_285, 32_038_725, 322_278_385),
    "ml-20m": (138_493, 26_744, 20_000_263),
    "ml-1m": (6_040, 3_706, 1_000_209),
}
OFFICIAL_FILES = {
    "kuairand-pure": ["log_standard_4_08_to_4_21_pure.csv", "log_standard_4_22_to_5_08_pure.csv",
                      "user_features_pure.csv"],
    "kuairand-1k": ["log_standard_4_08_to_4_21_1k.csv", "log_standard_4_22_to_5_08_1k.csv",
                    "user_features_1k.csv"],
    "kuairand-27k": [f"log_standard_{p}_27k_part{k}.csv" for p in ("4_08_to_4_21", "4_22_to_5_08")
                     for k in (1, 2)] + ["user_features_27k.csv"],
    "ml-20m": ["ratings.csv"],
    "ml-1m": ["ratings.dat", "users.dat"],
}  # fmt: skip


@pytest.mark.parametrize(
    "dataset,fraction",
    [("kuairand-pure", 0.01), ("kuairand-1k", 0.001), ("kuairand-27k", 0.0001),
     ("ml-20m", 0.0005), ("ml-1m", 0.01)],
)  # fmt: skip
def test_synthesized_raw_files_round_trip_with_the_official_counts(tmp_path, dataset, fraction):
    raw = tmp_path / "raw"
    synthesize(dataset, fraction, raw, seed=1)
    assert sorted(p.name for p in raw.iterdir()) == sorted(OFFICIAL_FILES[dataset])
    log_files = [p for p in raw.iterdir() if p.name.startswith(("log_", "ratings"))]
    text = [p.read_text().splitlines() for p in log_files]
    header = 0 if dataset == "ml-1m" else 1
    rows = sum(len(t) - header for t in text)
    if dataset.startswith("kuairand"):
        assert all(t[0] == KUAIRAND_LOG_HEADER for t in text)
        user_lines = (raw / f"user_features_{dataset.split('-')[1]}.csv").read_text().splitlines()
        assert user_lines[0].startswith(KUAIRAND_USER_HEADER + ",onehot_feat0,")
        fields = next(csv.reader([user_lines[1]]))
        assert len(fields) == len(user_lines[0].split(","))  # quoted ranges keep their comma
        assert '"[' in "\n".join(user_lines) or '"(' in "\n".join(user_lines)
    elif dataset == "ml-20m":
        assert text[0][0] == "userId,movieId,rating,timestamp"
        assert {line.split(",")[2] for line in text[0][1:]} <= {
            f"{x / 2:.1f}" for x in range(1, 11)
        }
    else:
        assert all(len(line.split("::")) == 4 for line in text[0])

    meta = preprocess(dataset, raw, tmp_path / "out", verbose=False)
    users, items, interactions = OFFICIAL_SIZES[dataset]
    assert meta["num_users"] == max(1, round(users * fraction))
    assert meta["num_distinct_items"] == max(1, round(items * fraction))
    assert meta["num_interactions"] == rows >= round(interactions * fraction)
    assert meta["dropped_users"] == 0
    least = 20 if dataset.startswith("ml") else 2
    assert meta["seqlen"]["min"] >= least


def test_a_log_with_a_header_only_is_named(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"raw/ratings\.csv: no interactions"):
        preprocess("ml-20m", raw, tmp_path / "out", verbose=False)
