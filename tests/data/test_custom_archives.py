"""Own data (``--dataset custom``) from archives, as the built-in datasets read them (issue 30,
point 6), and training's column aliases (``user`` for ``user_id``: hstu.columns, shared with
hstu.recommend)."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.data.data_args import CustomDataArgs
from hstu.data.errors import DataError
from hstu.data.preprocess import preprocess

CSV = "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu1,c,3\nu2,b,1\nu2,c,5\n"


def _sequences(tmp_path, raw) -> list[dict]:
    preprocess(
        "custom",
        None,
        tmp_path / "out",
        custom=CustomDataArgs(path=str(raw)),
        verbose=False,
        output_name="clicks",
        force=True,
    )
    rows = pq.read_table(tmp_path / "out" / "clicks" / "sequences.parquet").to_pylist()
    return [(r["raw_user_id"], r["item_ids"]) for r in rows]


WANT = [("u1", [1, 2, 3]), ("u2", [2, 3])]


def test_zip_tar_gz_and_parquet_gz(tmp_path) -> None:
    z = tmp_path / "clicks.zip"
    with zipfile.ZipFile(z, "w") as fh:
        fh.writestr("clicks/log.csv", CSV)
        fh.writestr("clicks/README", "not data")
    assert _sequences(tmp_path, z) == WANT
    t = tmp_path / "clicks.tar.gz"
    with tarfile.open(t, "w:gz") as fh:
        info = tarfile.TarInfo("log.jsonl")
        text = (
            b'{"user_id": "u1", "item_id": "a", "timestamp": 1}\n'
            b'{"user_id": "u1", "item_id": "b", "timestamp": 2}\n'
            b'{"user_id": "u1", "item_id": "c", "timestamp": 3}\n'
            b'{"user_id": "u2", "item_id": "b", "timestamp": 1}\n'
            b'{"user_id": "u2", "item_id": "c", "timestamp": 5}\n'
        )
        info.size = len(text)
        fh.addfile(info, io.BytesIO(text))
    assert _sequences(tmp_path, t) == WANT
    buf = io.BytesIO()
    pq.write_table(
        pa.table(
            {
                "user_id": ["u1", "u1", "u1", "u2", "u2"],
                "item_id": list("abcbc"),
                "timestamp": [1, 2, 3, 1, 5],
            }
        ),
        buf,
    )
    g = tmp_path / "clicks.parquet.gz"
    g.write_bytes(gzip.compress(buf.getvalue()))
    assert _sequences(tmp_path, g) == WANT


def test_an_archive_with_several_data_files_names_them(tmp_path) -> None:
    z = tmp_path / "two.zip"
    with zipfile.ZipFile(z, "w") as fh:
        fh.writestr("a.csv", CSV)
        fh.writestr("b.csv", CSV)
    with pytest.raises(DataError) as err:
        _sequences(tmp_path, z)
    assert str(err.value) == (
        f"{z}: 2 .csv/.tsv/.txt/.jsonl/.json/.ndjson/.parquet files in the zip "
        "archive (members: a.csv, b.csv); it must hold exactly one: extract the "
        "one to read"
    )


def test_a_bad_line_in_an_archive_member_names_the_member(tmp_path) -> None:
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as fh:
        fh.writestr("log.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,x\n")
    with pytest.raises(DataError, match=r"^bad\.zip:log\.csv:3: field timestamp"):
        _sequences(tmp_path, z)


def test_training_reads_the_user_item_time_aliases(tmp_path) -> None:
    """The names hstu.recommend reads (``user``, ``item``, ``time``) train too."""
    raw = tmp_path / "aliases.csv"
    raw.write_text(CSV.replace("user_id,item_id,timestamp", "user,item,time"))
    assert _sequences(tmp_path, raw) == WANT
    # a column named explicitly is taken as given: no alias
    args = CustomDataArgs(path=str(raw), user_column="visitor")
    with pytest.raises(DataError, match="visitor"):
        preprocess(
            "custom",
            None,
            tmp_path / "out",
            custom=args,
            verbose=False,
            output_name="v",
            force=True,
        )


def test_movielens_own_column_names_are_read(tmp_path) -> None:
    """A MovieLens ratings.csv (``userId,movieId,rating,timestamp``) as it comes, with only the
    rating named as the action: ``userId`` / ``movieId`` are default aliases, ``timestamp``
    the default, half-star ratings one class each."""
    raw = tmp_path / "ratings.csv"
    raw.write_text(
        "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n"
        "1,1061,3.0,1260759182\n2,10,4.0,835355493\n2,17,5.0,835355681\n"
    )
    preprocess("custom", None, tmp_path / "out", custom=CustomDataArgs(
        path=str(raw), action_column="rating"), verbose=False, output_name="ml")  # fmt: skip
    rows = pq.read_table(tmp_path / "out" / "ml" / "sequences.parquet").to_pylist()
    items = pq.read_table(tmp_path / "out" / "ml" / "item_map.parquet").to_pydict()
    raw_of = dict(zip(items["item_id"], items["raw_item_id"]))
    assert [(r["raw_user_id"], [raw_of[i] for i in r["item_ids"]]) for r in rows] == [
        (1, [31, 1029, 1061]),
        (2, [10, 17]),
    ]
    assert [r["actions"] for r in rows] == [[0, 1, 1], [2, 3]]  # 2.5, 3.0, 4.0, 5.0
    # serving reads the same names (one definition, hstu.columns)
    from hstu.columns import pick_column

    have = ["userId", "movieId", "rating", "timestamp"]
    assert [pick_column(r, have) for r in ("user", "item", "timestamp")] == [
        "userId", "movieId", "timestamp"]
