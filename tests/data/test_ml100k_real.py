"""The real MovieLens-100K (read from ../shared/data; skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hstu.args import DatasetArgs
from hstu.data import build_data
from hstu.data.preprocess import preprocess
from hstu.data.store import SequenceStore
from tests.data.helpers import ML100K_RAW, needs_ml100k

RAW = ML100K_RAW
pytestmark = needs_ml100k


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ml100k")
    preprocess("ml-100k", RAW, out, verbose=False)
    return out / "ml-100k"


def test_counts(processed):
    store = SequenceStore.load(processed)
    meta = store.metadata
    assert (meta["num_users"], meta["num_distinct_items"], meta["num_interactions"]) == (
        943,
        1682,
        100000,
    )
    assert store.num_users == 943 and len(store.items) == 100000 and meta["num_items"] == 1683


def test_stable_ties_pick_the_files_last_row(processed):
    raw = np.loadtxt(RAW / "u.data", dtype=np.int64)
    store = SequenceStore.load(processed)
    last_items = store.items[store.offsets[1:] - 1]
    for u in range(1, 944):
        rows = raw[raw[:, 0] == u]
        latest = rows[rows[:, 3] == rows[:, 3].max()]
        assert last_items[u - 1] == latest[-1, 1], u


def test_leave_one_out(processed):
    train, ev, info = build_data(
        DatasetArgs(dataset_name="ml-100k", max_sequence_length=200, dataset_path=str(processed)),
        "retrieval",
        128,
        128,
        0,
        1,
        0,
    )
    targets = {}
    for b in ev:
        for uid, label in zip(b.features["user_id"].values().tolist(), b.labels.tolist()):
            targets[uid] = label
    assert len(targets) == 943 == info.num_eval_samples
    seen = 0
    for b in train:
        kjt = b.features["item_id"]
        for uid, items in zip(
            b.features["user_id"].values().tolist(),
            torch.split(kjt.values(), kjt.lengths().tolist()),
        ):
            assert targets[uid] not in items.tolist(), uid
            seen += 1
    assert seen == 943
