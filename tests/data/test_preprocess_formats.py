"""Each raw format, written small in the test, gives exactly the expected processed output."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.data.data_args import CustomDataArgs, SyntheticDataArgs
from hstu.data.preprocess import preprocess
from tests.data.helpers import (
    KUAIRAND_LOG_HEADER,
    KUAIRAND_USER_HEADER,
    kuairand_row,
    lines,
    ml1m_zip,
    preprocess_ml100k,
    write_tar_gz,
    write_zip,
)


def read_rows(out_dir) -> list[dict]:
    return pq.read_table(out_dir / "sequences.parquet").to_pylist()


def test_ml_1m_zip_exact(tmp_path):
    meta = preprocess("ml-1m", ml1m_zip(tmp_path), tmp_path / "out", verbose=False)
    rows = read_rows(tmp_path / "out" / "ml-1m")
    # items 10,11,12,20,21,22 -> dense 1..6; user 1: 12@90, then the tie 10@100, 11@100 in file order.
    assert [r["item_ids"] for r in rows] == [[3, 1, 2], [5, 4, 6]]
    assert [r["actions"] for r in rows] == [[0, 4, 3], [1, 2, 4]]  # rating - 1
    assert [r["timestamps"] for r in rows] == [[90, 100, 100], [40, 50, 60]]
    assert [r["user_id"] for r in rows] == [1, 2]
    # user table (user 3 has no ratings): sex F<M, age codes [1,25,56], occupations [10,15,16].
    assert [(r["sex"], r["age_group"], r["occupation"], r["zip_code"]) for r in rows] == [
        (1, 1, 1, 1),
        (2, 3, 3, 3),
    ]
    assert meta["num_users"] == 2 and meta["num_interactions"] == 6 and meta["num_items"] == 7
    assert meta["num_action_values"] == 5
    assert meta["contextual_vocab_sizes"] == {
        "user_id": 3,
        "sex": 3,
        "age_group": 4,
        "occupation": 4,
        "zip_code": 4,
    }
    item_map = pq.read_table(tmp_path / "out" / "ml-1m" / "item_map.parquet").to_pydict()
    assert item_map == {"item_id": [1, 2, 3, 4, 5, 6], "raw_item_id": [10, 11, 12, 20, 21, 22]}
    assert len(meta["source"]["checksum"]) == 64


def test_ml_20m_ratings_csv_half_stars(tmp_path):
    csv = lines(
        [
            "userId,movieId,rating,timestamp",
            "7,5,0.5,30",
            "7,3,5.0,10",
            "9,5,3.5,20",
            "7,4,2.0,20",
            "9,1,4.0,20",
        ]
    )
    meta = preprocess(
        "ml-20m",
        write_zip(tmp_path / "ml-20m.zip", {"ml-20m/ratings.csv": csv}),
        tmp_path,
        verbose=False,
    )
    rows = read_rows(tmp_path / "ml-20m")
    # raw items 1,3,4,5 -> 1..4; user 9 has a tie at t=20 (5 then 1, file order).
    assert [r["item_ids"] for r in rows] == [[2, 3, 4], [4, 1]]
    assert [r["actions"] for r in rows] == [[9, 3, 0], [6, 7]]  # rating x2 - 1
    assert meta["num_action_values"] == 10 and meta["contextual_feature_names"] == ["user_id"]


def test_ml_100k_folder_age_groups(tmp_path):
    meta = preprocess_ml100k(
        tmp_path,
        ["2\t7\t1\t5", "1\t3\t5\t9", "1\t2\t4\t8", "2\t3\t2\t4"],
        ["1|24|M|technician|85711", "2|7|F|artist|94043"],
    )
    rows = read_rows(tmp_path / "out" / "ml-100k")
    assert [r["item_ids"] for r in rows] == [[1, 2], [2, 3]]
    assert [r["actions"] for r in rows] == [[3, 4], [1, 0]]
    # ages 24 -> group 18, 7 -> group 1; codes over the groups present [1, 18].
    assert [(r["age_group"], r["sex"], r["occupation"]) for r in rows] == [(2, 2, 2), (1, 1, 1)]
    assert meta["contextual_vocab_sizes"]["age_group"] == 3


@pytest.mark.parametrize("variant,suffix", [("kuairand-pure", "pure"), ("kuairand-1k", "1k")])
def test_kuairand_tar_bitmask_and_merge(tmp_path, variant, suffix):
    log_a = lines(
        [
            KUAIRAND_LOG_HEADER,
            kuairand_row(5, 100, 2000, {"is_click": 1, "is_like": 1, "long_view": 1}),
            kuairand_row(6, 300, 1500),
        ]
    )
    log_b = lines(
        [
            KUAIRAND_LOG_HEADER,
            kuairand_row(5, 200, 1000, {"is_profile_enter": 1, "is_hate": 1}),
            kuairand_row(6, 100, 1500, {"is_follow": 1, "is_comment": 1, "is_forward": 1}),
        ]
    )
    users = lines(
        [
            KUAIRAND_USER_HEADER,
            # as the official CSV writes them: range fields hold a comma, so they are quoted
            '5,full_active,0,0,0,3,"(0,10]",1,"[0,10)",2,"[0,5)",100,61-90',
            '6,high_active,0,0,0,30,"(10,50]",1,"[0,10)",2,"[0,5)",400,365+',
        ]
    )
    top = f"KuaiRand-{suffix}/data/"
    archive = write_tar_gz(
        tmp_path / f"KuaiRand-{suffix}.tar.gz",
        {
            top + f"log_standard_4_08_to_4_21_{suffix}.csv": log_a,
            top + f"log_standard_4_22_to_5_08_{suffix}.csv": log_b,
            top + f"log_random_4_22_to_5_08_{suffix}.csv": lines(
                [KUAIRAND_LOG_HEADER, kuairand_row(5, 999, 1)]
            ),
            top + f"user_features_{suffix}.csv": users,
        },
    )
    meta = preprocess(variant, archive, tmp_path / "out", verbose=False)
    rows = read_rows(tmp_path / "out" / variant)
    # videos 100,200,300 -> 1,2,3 (the random log is not read); user 6 tie at 1500 ms: file order.
    assert [r["item_ids"] for r in rows] == [[2, 1], [3, 1]]
    assert [r["actions"] for r in rows] == [[128 + 32, 1 + 2 + 64], [0, 4 + 8 + 16]]
    assert [r["timestamps"] for r in rows] == [[1, 2], [1, 1]]
    assert meta["num_action_values"] == 256
    assert meta["contextual_feature_names"] == [
        "user_id",
        "follow_user_num_range",
        "fans_user_num_range",
        "friend_user_num_range",
        "register_days_range",
    ]
    assert [r["follow_user_num_range"] for r in rows] == [1, 2] and [
        r["register_days_range"] for r in rows
    ] == [2, 1]


def test_custom_csv_string_ids_ms_and_latest_context(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text(
        lines(
            [
                "who,what,when,act,country",
                "bob,pear,3000,1,fr",
                "amy,fig,1000,0,de",
                "bob,fig,2000,2,uk",
                "amy,pear,5000,1,de",
            ]
        )
    )
    args = CustomDataArgs(
        path=str(csv),
        user_column="who",
        item_column="what",
        timestamp_column="when",
        timestamp_unit="ms",
        action_column="act",
        contextual_columns=["country"],
    )
    meta = preprocess("custom", None, tmp_path / "out", custom=args, verbose=False)
    rows = read_rows(tmp_path / "out" / "custom")
    assert [r["raw_user_id"] for r in rows] == ["amy", "bob"]
    assert [r["item_ids"] for r in rows] == [[1, 2], [1, 2]]  # fig=1, pear=2
    assert [r["actions"] for r in rows] == [[0, 1], [2, 1]]
    assert [r["timestamps"] for r in rows] == [[1, 5], [2, 3]]
    # bob's most recent row says fr; values present: de, fr -> 1, 2.
    assert [r["country"] for r in rows] == [1, 2]
    assert meta["num_action_values"] == 3 and meta["contextual_vocab_sizes"]["country"] == 3


def test_custom_parquet_declared_vocab_keeps_ids(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(
        pa.table({"user_id": [1, 1, 2, 2], "item_id": [9, 4, 4, 0], "timestamp": [2, 1, 1, 2]}),
        path,
    )
    meta = preprocess(
        "custom",
        None,
        tmp_path,
        custom=CustomDataArgs(path=str(path), item_vocab_size=10),
        verbose=False,
    )
    rows = read_rows(tmp_path / "custom")
    assert [r["item_ids"] for r in rows] == [[4, 9], [4, 0]]
    assert meta["num_items"] == 10 and meta["action_feature_name"] is None


def test_rerun_is_noop_unless_forced(tmp_path, capsys):
    raw = ml1m_zip(tmp_path)
    preprocess("ml-1m", raw, tmp_path / "out", verbose=False)
    stamp = (tmp_path / "out" / "ml-1m" / "sequences.parquet").stat().st_mtime_ns
    preprocess("ml-1m", raw, tmp_path / "out")
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "out" / "ml-1m" / "sequences.parquet").stat().st_mtime_ns == stamp
    preprocess("ml-1m", raw, tmp_path / "out", force=True, verbose=False)
    assert (tmp_path / "out" / "ml-1m" / "sequences.parquet").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ml-1m"]  # no temp folders left


def test_synthetic_deterministic_and_seed_dependent(tmp_path):
    small = {"num_users": 50, "num_items": 40, "min_length": 5, "max_length": 12}
    a = preprocess(
        "synthetic", out=tmp_path / "a", synthetic=SyntheticDataArgs(**small), verbose=False
    )
    b = preprocess(
        "synthetic", out=tmp_path / "b", synthetic=SyntheticDataArgs(**small), verbose=False
    )
    preprocess(
        "synthetic", out=tmp_path / "c", synthetic=SyntheticDataArgs(**small, seed=7), verbose=False
    )
    ta, tb, tc = (pq.read_table(tmp_path / x / "synthetic" / "sequences.parquet") for x in "abc")
    assert ta.equals(tb) and not ta.equals(tc)
    assert a["num_users"] == 50 and a["contextual_feature_names"] == ["user_id", "segment"]
    assert json.dumps(a["source"]) == json.dumps(b["source"])


def _hit_rate_at_10(
    train_items: list[np.ndarray], targets: np.ndarray, num_items: int
) -> tuple[float, float]:
    """(bigram HR@10, popularity HR@10) of the next item after each training sequence."""
    counts = np.zeros((num_items, num_items))
    pop = np.zeros(num_items)
    for seq in train_items:
        np.add.at(counts, (seq[:-1], seq[1:]), 1)
        np.add.at(pop, seq, 1)
    top_pop = set(np.argsort(-pop)[:10].tolist())
    last = np.array([s[-1] for s in train_items])
    top_bigram = np.argsort(-(counts[last] + 1e-6 * pop), axis=1)[:, :10]
    bigram = np.mean([t in row for t, row in zip(targets, top_bigram)])
    popular = np.mean([t in top_pop for t in targets])
    return float(bigram), float(popular)


def test_synthetic_default_rewards_sequence_models(tmp_path):
    meta = preprocess("synthetic", out=tmp_path, verbose=False)
    seqs = [
        np.asarray(s)
        for s in pq.read_table(tmp_path / "synthetic" / "sequences.parquet")
        .column("item_ids")
        .to_pylist()
    ]
    bigram, popular = _hit_rate_at_10(
        [s[:-1] for s in seqs], np.array([s[-1] for s in seqs]), meta["num_items"]
    )
    assert bigram > 0.5, bigram
    assert bigram > 4 * popular, (bigram, popular)
