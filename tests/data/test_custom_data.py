"""A newcomer's own files (issue 14): JSON lines, CSV/TSV with string ids, float ratings, --raw
and --name, and the preprocessor's gin checked like the trainer's (one line, did-you-mean)."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest

from hstu.data.data_args import CustomDataArgs
from hstu.data.errors import DataError
from hstu.data.preprocess import main, preprocess

REVIEWS = [  # Amazon-reviews style: string ids, float ratings, extra nested fields
    {"reviewerID": "A2X", "asin": "B001", "overall": 4.5, "unixReviewTime": 30, "style": {"s": 1}},
    {"reviewerID": "A2X", "asin": "B007", "overall": 3.0, "unixReviewTime": 10},
    {"reviewerID": "A9Z", "asin": "B001", "overall": 5.0, "unixReviewTime": 20},
    {"reviewerID": "A9Z", "asin": "0312", "overall": 0.5, "unixReviewTime": 25},
    {"reviewerID": "A2X", "asin": "0312", "overall": 4.5, "unixReviewTime": 20},
]


def _reviews_args(path, **kw) -> CustomDataArgs:
    return CustomDataArgs(
        path=str(path), user_column="reviewerID", item_column="asin",
        timestamp_column="unixReviewTime", action_column="overall", **kw,
    )


def rows(folder) -> list[dict]:
    return pq.read_table(folder / "sequences.parquet").to_pylist()


@pytest.mark.parametrize("suffix", [".jsonl", ".json.gz"])
def test_json_lines_string_ids_half_star_ratings(tmp_path, suffix):
    text = "\n".join(json.dumps(r) for r in REVIEWS) + "\n"
    path = tmp_path / f"reviews{suffix}"
    path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    meta = preprocess("custom", None, tmp_path / "out", custom=_reviews_args(path), verbose=False,
                      output_name="books")
    got = rows(tmp_path / "out" / "books")
    # items "0312" < "B001" < "B007" -> 1, 2, 3; ratings 0.5, 3.0, 4.5, 5.0 -> classes 0..3
    assert [r["item_ids"] for r in got] == [[3, 1, 2], [2, 1]]
    assert [r["actions"] for r in got] == [[1, 2, 2], [3, 0]]
    assert meta["dataset"] == "books" and meta["num_action_values"] == 4
    assert meta["action_values"] == [0.5, 3.0, 4.5, 5.0] and meta["action_kind"] == "classes"


def test_json_lines_ids_changing_type_and_a_bad_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"u": 1, "i": "x", "t": 1}\n{"u": "b", "i": 7, "t": 2}\n{"u": "b", "i": "x", "t": 3}\n'
                    '{"u": 1, "i": 7, "t": 4}\n')
    args = CustomDataArgs(path=str(path), user_column="u", item_column="i", timestamp_column="t")
    meta = preprocess("custom", None, tmp_path / "out", custom=args, verbose=False)
    assert meta["num_users"] == 2 and meta["num_distinct_items"] == 2
    path.write_text('{"u": 1, "i": 2, "t": 1}\n{"u": 1, "i": 3 "t": 2}\n')
    with pytest.raises(DataError, match=r"log\.jsonl:2: not a JSON object"):
        preprocess("custom", None, tmp_path / "out", custom=args, verbose=False, force=True)
    path.write_text('{"u": 1, "i": 2, "t": 1}\n{"user": 1, "i": 3, "t": 2}\n')
    with pytest.raises(DataError, match=r"log\.jsonl:2: field u: missing column \(the file has user, i, t\)"):
        preprocess("custom", None, tmp_path / "out", custom=args, verbose=False, force=True)


def test_tsv_float_ratings_integral_and_bins(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("user\titem\tts\tscore\nu1\ta\t1\t4.0\nu1\tb\t2\t1.0\nu2\ta\t1\t2.0\nu2\tb\t2\t0.0\n")
    args = CustomDataArgs(path=str(path), user_column="user", item_column="item",
                          timestamp_column="ts", action_column="score")
    meta = preprocess("custom", None, tmp_path / "a", custom=args, verbose=False)
    assert [r["actions"] for r in rows(tmp_path / "a" / "custom")] == [[4, 1], [2, 0]]
    assert meta["num_action_values"] == 5 and meta["action_values"] is None
    binned = CustomDataArgs(path=str(path), user_column="user", item_column="item",
                            timestamp_column="ts", action_column="score", action_bins=[1.5, 3.5])
    meta = preprocess("custom", None, tmp_path / "b", custom=binned, verbose=False)
    assert [r["actions"] for r in rows(tmp_path / "b" / "custom")] == [[2, 0], [1, 0]]
    assert meta["num_action_values"] == 3


def test_no_rating_column_and_raw_flag(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("user_id,item_id,timestamp\nz,p1,5\nz,p2,6\ny,p1,1\ny,p3,2\n")
    assert main(["--dataset", "custom", "--raw", str(path), "--out", str(tmp_path), "--name",
                 "clicks", "--quiet"]) == 0
    meta = json.loads((tmp_path / "clicks" / "metadata.json").read_text())
    assert meta["action_feature_name"] is None and meta["num_users"] == 2


def test_preprocessor_gin_typos_are_one_line_with_a_suggestion(tmp_path, capsys):
    path = tmp_path / "clicks.csv"
    path.write_text("user_id,item_id,timestamp\nz,p1,5\nz,p2,6\n")
    gin_file = tmp_path / "data.gin"
    gin_file.write_text('# my data\nCustomDataArgs.user_colum = "user_id"\n')
    base = ["--dataset", "custom", "--raw", str(path), "--out", str(tmp_path / "o")]
    assert main([*base, "--gin-file", str(gin_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {gin_file}:2: CustomDataArgs.user_colum: unknown field (did you mean 'user_column'?)"
    gin_file.write_text('CustomDataArg.path = "x.csv"\n')
    assert main([*base, "--gin-file", str(gin_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {gin_file}:1: CustomDataArg: unknown gin class (did you mean 'CustomDataArgs'?)"
    assert main([*base, "--gin-param", "CustomDataArgs.user_column=user_id"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'CustomDataArgs.user_column="user_id"' in err
    assert main([*base, "--gin-param", "CustomDataArgs.timestamp_unit='h'"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gin-param") and "timestamp_unit: must be 's' or 'ms'" in err


def test_custom_name_must_not_be_a_builtin(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("user_id,item_id,timestamp\nz,p1,5\nz,p2,6\n")
    with pytest.raises(DataError, match="'ml-1m' is a built-in dataset"):
        preprocess("custom", path, tmp_path, verbose=False, output_name="ml-1m")


def test_whole_float_timestamps_and_a_named_delimiter_for_any_extension(tmp_path):
    """A RecBole-style atomic file (`.inter`, tab-separated, typed headers, timestamps written
    as floats) reads as it is once the delimiter is named; a timestamp with a fraction is
    still one line naming its row."""
    path = tmp_path / "ml.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                    "u1\tGoldenEye (1995)\t978300760.0\nu1\tHeat (1995)\t978300700.0\n"
                    "u2\tHeat (1995)\t3e2\nu2\tGoldenEye (1995)\t301\n")
    args = CustomDataArgs(path=str(path), user_column="user_id:token",
                          item_column="item_id:token", timestamp_column="timestamp:float")
    with pytest.raises(DataError, match=r"ml\.inter: unknown format: .*CustomDataArgs\.delimiter"):
        preprocess("custom", None, tmp_path / "out", custom=args, verbose=False)
    args.delimiter = "\t"
    meta = preprocess("custom", None, tmp_path / "out", custom=args, verbose=False)
    got = rows(tmp_path / "out" / "custom")
    # items sorted: GoldenEye 1, Heat 2; u1 in time order: Heat (...700) then GoldenEye (...760)
    assert [r["item_ids"] for r in got] == [[2, 1], [2, 1]] and meta["num_users"] == 2
    assert [r["timestamps"] for r in got] == [[978300700, 978300760], [300, 301]]
    path.write_text(path.read_text().replace("\t301\n", "\t301.5\n"))
    with pytest.raises(DataError, match=r"ml\.inter:5: field timestamp:float: expected an integer"):
        preprocess("custom", None, tmp_path / "out", custom=args, verbose=False, force=True)
