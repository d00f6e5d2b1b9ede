"""The memory-mapped layout of a preprocessed dataset (hstu.data.store): its content, reuse,
rebuild, read-only dataset folders, several processes of a node, no copies in the loaders."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hstu.args import DatasetArgs
from hstu.data import build_data
from hstu.data import store as store_module
from hstu.data.data_args import SyntheticDataArgs
from hstu.data.errors import DataError
from hstu.data.layout import CACHE_ENV, MAPPED_PREFIX, SEQUENCES_FILE
from hstu.data.preprocess import preprocess
from hstu.data.store import SequenceStore, layout_key

REPO = Path(__file__).resolve().parents[2]


def make(out: Path, **kw) -> Path:
    synthetic = SyntheticDataArgs(**{"num_users": 40, "num_items": 30, "min_length": 3, "max_length": 25, **kw})
    preprocess("synthetic", out=out, synthetic=synthetic, verbose=False)
    return out / "synthetic"


@pytest.fixture
def dataset(tmp_path) -> Path:
    store_module._OPEN.clear()
    return make(tmp_path / "data")


def assert_equals_parquet(store: SequenceStore, folder: Path) -> None:
    table = pq.read_table(folder / SEQUENCES_FILE)
    bounds = list(zip(store.offsets[:-1].tolist(), store.offsets[1:].tolist(), strict=True))
    assert [store.items[a:b].tolist() for a, b in bounds] == table.column("item_ids").to_pylist()
    assert [store.timestamps[a:b].tolist() for a, b in bounds] == table.column("timestamps").to_pylist()
    assert [store.actions[a:b].tolist() for a, b in bounds] == table.column("actions").to_pylist()
    assert store.contextual, "the synthetic data has contextual features"
    for name, values in store.contextual.items():
        assert values.tolist() == table.column(name).to_pylist()


def test_mapped_arrays_equal_the_parquet(dataset):
    store = SequenceStore.load(dataset)
    assert store.folder is not None and store.folder.parent == dataset
    assert store.folder.name.startswith(MAPPED_PREFIX)
    arrays = [store.offsets, store.items, store.timestamps, store.actions, *store.contextual.values()]
    for a in arrays:  # read-only maps of the files, no copies
        assert isinstance(a, np.memmap) and not a.flags.writeable
        assert Path(a.filename).parent == store.folder
    assert store.items.dtype == np.int32 and store.timestamps.dtype == np.int64
    assert_equals_parquet(store, dataset)


def test_a_second_load_maps_without_rewriting(dataset, capsys):
    first = SequenceStore.load(dataset)
    assert "wrote the mapped layout" in capsys.readouterr().out
    folder = first.folder
    stamps = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.iterdir()}
    assert SequenceStore.load(dataset) is first  # one mapping per process
    del first
    gc.collect()
    store_module._OPEN.clear()  # a new process: from the files
    second = SequenceStore.load(dataset)
    assert "wrote" not in capsys.readouterr().out
    assert second.folder == folder
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.iterdir()} == stamps
    assert_equals_parquet(second, dataset)


def test_a_changed_dataset_rebuilds(dataset, tmp_path, capsys):
    old = SequenceStore.load(dataset)
    old_items = old.items.tolist()
    # the dataset preprocessed again from other input, its files replaced in place
    other = make(tmp_path / "other", num_users=33, seed=7)
    for name in (SEQUENCES_FILE, "metadata.json"):
        shutil.copyfile(other / name, dataset / name)
    capsys.readouterr()
    new = SequenceStore.load(dataset)
    assert "wrote the mapped layout" in capsys.readouterr().out
    assert new.folder != old.folder and not old.folder.exists()  # the stale layout removed
    assert new.num_users == 33
    assert_equals_parquet(new, dataset)
    assert old.items.tolist() == old_items  # a process still mapping the old one keeps it


def _read_only(folder: Path) -> None:
    os.chmod(folder, 0o555)
    if os.geteuid() == 0:  # root writes through permissions: make the folder immutable
        result = subprocess.run(
            ["chattr", "+i", str(folder)], check=False, capture_output=True, text=True
        )
        if result.returncode != 0:
            os.chmod(folder, 0o755)
            pytest.skip(f"running as root and chattr +i failed: {result.stderr.strip()}")


def _writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    os.chmod(folder, 0o755)


def test_a_read_only_dataset_folder_maps_from_the_cache(dataset, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    before = sorted(os.listdir(dataset))
    _read_only(dataset)
    try:
        store = SequenceStore.load(dataset)
        assert sorted(os.listdir(dataset)) == before  # nothing written into the dataset
        out = capsys.readouterr().out
        assert f"{dataset} is not writable: its mapped layout is {store.folder}" in out
        assert store.folder.parent == cache and store.folder.is_dir()
        assert_equals_parquet(store, dataset)
        store_module._OPEN.clear()
        again = SequenceStore.load(dataset)
        assert again.folder == store.folder and "wrote" not in capsys.readouterr().out
    finally:
        _writable(dataset)


_CHILD = """
import os, sys
from hstu.data.store import SequenceStore
s = SequenceStore.load(sys.argv[1])
print("MAPPED", s.folder, os.stat(s.items.filename).st_ino, int(s.items.sum()), flush=True)
"""


def test_two_processes_map_one_layout(dataset):
    lock_path = dataset / f"{MAPPED_PREFIX}{layout_key(dataset)}.lock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(lock_path, "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # both processes arrive while "another" writes it
        procs = [
            subprocess.Popen([sys.executable, "-c", _CHILD, str(dataset)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)
        ]
        for p in procs:
            assert "waiting for another process" in p.stdout.readline()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count("wrote the mapped layout") for o in outs) == 1, outs
    mapped = [next(line for line in o.splitlines() if line.startswith("MAPPED")) for o in outs]
    assert mapped[0] == mapped[1]  # the same folder, the same file (inode), the same content
    store_module._OPEN.clear()
    assert mapped[0] == f"MAPPED {SequenceStore.load(dataset).folder} " + " ".join(mapped[0].split()[2:])


def test_loaders_do_not_copy_the_store(tmp_path):
    """Loading and a few batches allocate far less than the store's arrays (tracemalloc counts
    numpy's allocations; a copy of the items alone would exceed the bound)."""
    store_module._OPEN.clear()
    folder = make(tmp_path / "long", num_users=24, min_length=4000, max_length=6000)
    SequenceStore.load(folder)  # the layout written once, outside the measurement
    store_module._OPEN.clear()
    args = DatasetArgs(dataset_name="synthetic", dataset_path=str(folder), max_sequence_length=16,
                       max_num_candidates=2)
    tracemalloc.start()
    try:
        for task in ("retrieval", "ranking"):
            train, ev, _ = build_data(args, task, 4, 4, 0, 1, 0)
            next(iter(train))
            next(iter(ev))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    store = train.store
    size = store.items.nbytes + store.timestamps.nbytes + store.actions.nbytes
    assert size > 1_500_000
    assert peak < size / 4, (peak, size)


def test_a_parquet_that_disagrees_with_its_metadata_is_refused(dataset):
    meta_path = dataset / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["num_interactions"] -= 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"sequences\.parquet.*item_ids.*num_interactions"):
        SequenceStore.load(dataset)
    assert not list(dataset.glob(f"{MAPPED_PREFIX}*/"))  # nothing half-written left behind
