"""Bad input: one-line errors naming file and line/field, and nothing written."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from hstu.data.data_args import CustomDataArgs
from hstu.data.errors import DataError
from hstu.data.preprocess import main, preprocess
from tests.data.helpers import (
    ML1M_RATINGS,
    ML1M_USERS,
    lines,
    ml1m_zip,
    preprocess_ml100k,
    write_zip,
)


def fails(tmp_path, name, raw, match, **kw) -> DataError:
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match) as info:
        preprocess(name, raw, out, verbose=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert not out.exists() or list(out.iterdir()) == [], "something was written"
    return info.value


def test_missing_file(tmp_path):
    raw = write_zip(tmp_path / "ml-1m.zip", {"ml-1m/ratings.dat": lines(ML1M_RATINGS)})
    fails(tmp_path, "ml-1m", raw, r"ml-1m\.zip: missing file users\.dat")


def test_missing_raw_path(tmp_path):
    fails(tmp_path, "ml-1m", tmp_path / "nope.zip", r"nope\.zip: no such file")


def test_truncated_zip(tmp_path):
    good = ml1m_zip(tmp_path).read_bytes()
    bad = tmp_path / "cut.zip"
    bad.write_bytes(good[: len(good) // 2])
    fails(tmp_path, "ml-1m", bad, r"cut\.zip: truncated or corrupt archive")


def test_truncated_tar_gz(tmp_path):
    from tests.data.helpers import write_tar_gz

    good = write_tar_gz(
        tmp_path / "k.tar.gz",
        {"d/log_standard_a.csv": "x" * 5000, "d/user_features_a.csv": "y" * 5000},
    ).read_bytes()
    bad = tmp_path / "KuaiRand-Pure.tar.gz"
    bad.write_bytes(good[: len(good) - 40])
    fails(tmp_path, "kuairand-pure", bad, r"KuaiRand-Pure\.tar\.gz.*truncated or corrupt")


@pytest.mark.parametrize("index, row, match", [
    (2, "1::11::4", r"ml-1m\.zip:ml-1m/ratings\.dat:3: expected 4 fields, got 3"),
    (4, "2::abc::2::40", r"ratings\.dat:5: field item: expected an integer, got 'abc'"),
    (1, "2::20::7::50", r"ratings\.dat:2: field rating: rating 7"),
], ids=["too-few-fields", "not-an-integer", "bad-rating"])
def test_a_bad_rating_row_names_its_line(tmp_path, index, row, match):
    rows = list(ML1M_RATINGS)
    rows[index] = row
    err = fails(tmp_path, "ml-1m", ml1m_zip(tmp_path, ratings=rows), match)
    assert err.line == index + 1


def test_empty_user(tmp_path):
    csv = lines(["userId,movieId,rating,timestamp", "1,2,3.0,4", ",5,3.0,6"])
    raw = write_zip(tmp_path / "ml-20m.zip", {"ml-20m/ratings.csv": csv})
    fails(tmp_path, "ml-20m", raw, r"ratings\.csv:3: field userId: empty value")


def test_newer_release_ids_beyond_the_historic_maximum_are_accepted(tmp_path):
    # ML-100K's release has 1,682 items; a newer MovieLens release in the same layout has
    # more: the size comes from the data (issue 14), not from the historic maximum.
    meta = preprocess_ml100k(
        tmp_path,
        ["1\t3\t5\t9", "1\t1683\t4\t8", "944\t3\t2\t1", "944\t9\t2\t2"],
        ["1|24|M|technician|85711", "944|30|F|writer|12345"],
    )
    assert meta["num_users"] == 2 and meta["num_items"] == 4  # dense ids 1..3
    item_map = pq.read_table(tmp_path / "out" / "ml-100k" / "item_map.parquet").to_pydict()
    assert item_map["raw_item_id"] == [3, 9, 1683]


def test_custom_overflow_names_users_column(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text(lines(["u,i,t", "1,3,1", "1,4,2", "2,12,3"]))
    args = CustomDataArgs(
        path=str(csv), user_column="u", item_column="i", timestamp_column="t", item_vocab_size=10
    )
    fails(tmp_path, "custom", None, r"log\.csv:4: field i: item id 12 overflows", custom=args)


def test_custom_missing_column_did_you_mean(tmp_path):
    csv = tmp_path / "log.csv"
    # (``user`` itself is an accepted alias of user_id: hstu.columns)
    csv.write_text(lines(["userid,item_id,timestamp", "1,3,1"]))
    fails(
        tmp_path,
        "custom",
        None,
        r"log\.csv:1: field user_id: missing column .*did you mean 'userid'",
        custom=CustomDataArgs(path=str(csv)),
    )


def test_duplicate_user_in_user_file(tmp_path):
    users = ML1M_USERS + ["2::F::18::1::12345"]
    fails(
        tmp_path,
        "ml-1m",
        ml1m_zip(tmp_path, users=users),
        r"users\.dat:4: field user: user 2 is listed twice \(first at line 2\)",
    )


def test_unknown_dataset_cli_did_you_mean(tmp_path, capsys):
    assert main(["--dataset", "ml-1mm", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown dataset 'ml-1mm' (did you mean 'ml-1m'?)" in err


def test_failed_rebuild_keeps_previous_output(tmp_path):
    out = tmp_path / "out"
    preprocess("ml-1m", ml1m_zip(tmp_path), out, verbose=False)
    before = (out / "ml-1m" / "sequences.parquet").read_bytes()
    bad_rows = list(ML1M_RATINGS) + ["x"]
    (tmp_path / "bad").mkdir()
    with pytest.raises(DataError):
        preprocess(
            "ml-1m", ml1m_zip(tmp_path / "bad", ratings=bad_rows), out, force=True, verbose=False
        )
    assert (out / "ml-1m" / "sequences.parquet").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["ml-1m"]
