"""Data faults: negative or backwards timestamps, a dataset name that does not match its
folder, and folders of a killed preprocess run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hstu.args import ConfigError, DatasetArgs
from hstu.data.build import build_data
from hstu.data.errors import DataError
from hstu.data.preprocess import preprocess
from hstu.data.store import SequenceStore
from tests.data.helpers import ML1M_RATINGS, ml1m_zip


def test_negative_timestamp_is_refused_counted_with_its_line(tmp_path):
    rows = list(ML1M_RATINGS)
    u, i, r, _ = rows[3].split("::")
    rows[3] = f"{u}::{i}::{r}::-5"
    with pytest.raises(DataError, match=r"ratings\.dat:4: field .*timestamp -5 is negative \(1 interactions"):
        preprocess("ml-1m", ml1m_zip(tmp_path, ratings=rows), tmp_path / "out", verbose=False)


def _synthetic(tmp_path):
    preprocess("synthetic", None, tmp_path, verbose=False)
    return tmp_path / "synthetic"


def test_backwards_timestamps_in_a_processed_folder_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = _synthetic(tmp_path)
    table = pq.read_table(folder / "sequences.parquet")
    ts = table.column("timestamps").to_pylist()
    ts[3] = list(reversed(ts[3]))
    ts[7][0] = -1
    table = table.set_column(table.column_names.index("timestamps"), "timestamps",
                             pa.array(ts, table.column("timestamps").type))
    pq.write_table(table, folder / "sequences.parquet")
    with pytest.raises(DataError, match=r"1 negative timestamps, 1 users whose timestamps go back in time \(first: user row 3\)"):
        SequenceStore.load(folder)


def test_dataset_name_must_match_the_folder(tmp_path):
    folder = _synthetic(tmp_path)
    args = DatasetArgs(dataset_name="ml-1m", dataset_path=str(folder), max_sequence_length=32)
    with pytest.raises(ConfigError, match=r"DatasetArgs\.dataset_name: is 'ml-1m' but .* holds 'synthetic'"):
        build_data(args, "retrieval", 8, 8, 0, 1, 0)


def test_killed_preprocess_folders_are_cleaned_on_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".synthetic.tmp-{pid}"
    stale.mkdir()
    (stale / "sequences.parquet").write_bytes(b"partial")
    mine = tmp_path / f".synthetic.tmp-{os.getppid()}"  # a live process: maybe still writing
    mine.mkdir()
    _synthetic(tmp_path)
    assert not stale.exists() and mine.exists()
    assert json.loads((tmp_path / "synthetic" / "metadata.json").read_text())["dataset"] == "synthetic"
    assert np.all(np.diff(SequenceStore.load(tmp_path / "synthetic").offsets) >= 0)
