"""Evaluation costs that must not grow with the data: the popularity baseline's item counts
come from the mapped item column in blocks (equal to a plain count of every training
interaction, without an array of their size); the evaluation's user subset is chosen without
anything of the user id range's size."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _plain(items, starts, ends, num_items):
    from hstu.data.loader import gather_ranges

    keep = ends > starts  # an empty or reversed range holds no row
    return np.bincount(items[gather_ranges(starts[keep], ends[keep])], minlength=num_items)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1 << 22])
def test_range_counts_equal_a_plain_count(block_rows):
    """Overlapping, nested, empty, adjacent and far-apart ranges, in any order, in blocks
    smaller than one range or larger than all."""
    from hstu.training.evaluate import range_item_counts

    rng = np.random.default_rng(block_rows)
    items = rng.integers(0, 50, 2000).astype(np.int32)
    starts = rng.integers(0, 1900, 120)
    ends = np.minimum(starts + rng.integers(0, 120, 120), 2000)
    starts = np.concatenate([starts, [5, 10, 300, 300, 1999, 40]])
    ends = np.concatenate([ends, [300, 20, 300, 301, 2000, 30]])  # nested, empty, reversed
    got = range_item_counts(items, starts, ends, 50, block_rows)
    assert got.dtype == np.int64
    assert np.array_equal(got, _plain(items, starts, ends, 50))
    disjoint = np.arange(0, 2000, 50)
    got = range_item_counts(items, disjoint, disjoint + 40, 50, block_rows)
    assert np.array_equal(got, _plain(items, disjoint, disjoint + 40, 50))


def test_popularity_baseline_counts_the_mapped_store_without_copying_it(tmp_path, monkeypatch):
    """On a preprocessed (memory-mapped) dataset of ~300k interactions: the counts equal a
    plain count over the training samples' rows, and the baseline's traced peak stays far
    under one int64 per interaction (a gather of every training row alone holds 12 bytes
    each: its int64 index and the int32 ids)."""
    import gin

    from hstu.config import load_config
    from hstu.data import build_data
    from hstu.data.data_args import SyntheticDataArgs
    from hstu.data.preprocess import preprocess
    from hstu.training import evaluate
    from hstu.training.distributed import DistEnv

    preprocess("synthetic", out=tmp_path, verbose=False, synthetic=SyntheticDataArgs(
        num_users=2000, num_items=400, min_length=100, max_length=200))
    path = os.path.join(tmp_path, "synthetic")
    gin.clear_config()
    cfg = load_config(str(ROOT / "configs" / "debug_retrieval.gin"), [
        f'DatasetArgs.dataset_path="{path}"', "DatasetArgs.max_sequence_length=256",
    ], task="retrieval")
    train, ev, _ = build_data(cfg.dataset, "retrieval", 64, 8, 0, 1, 0)
    store, samples = train.store, train.samples
    assert isinstance(store.items, np.memmap)
    rows = int((samples.cand_end - samples.hist_start).sum())
    assert rows > 250_000
    num_items = int(store.items.max()) + 1
    want = _plain(store.items, samples.hist_start, samples.cand_end, num_items)
    got = evaluate.range_item_counts(store.items, samples.hist_start, samples.cand_end,
                                     num_items, 4096)
    assert np.array_equal(got, want)

    monkeypatch.setattr(evaluate, "_COUNT_BLOCK_ROWS", 4096)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo",
                  tp_size=1, tp_rank=0, dp_size=1, dp_rank=0, tp_group=None, dp_group=None)
    tracemalloc.start()
    try:
        metrics = evaluate.popularity_baseline(train, ev, cfg, env, max_iters=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert metrics is not None and 0.0 <= metrics["HR@10"] <= 1.0
    # the old gather: 8 + 4 bytes per row; here the counting blocks and one evaluation batch
    assert peak < 4 * rows, f"traced peak {peak} bytes for {rows} training rows"


def test_eval_subset_needs_nothing_of_the_user_id_range(tmp_path):
    """User ids up to ~2e12 (a permutation of the id range would need 16 TB): the subset is
    the N samples whose seeded hash of the user id is smallest, the same at every call, another
    set for another seed, each user once."""
    from dataclasses import replace

    from hstu.args import DatasetArgs
    from hstu.data import build_data
    from hstu.data.data_args import SyntheticDataArgs
    from hstu.data.preprocess import preprocess
    from hstu.training.evaluate import _user_keys, eval_subset

    preprocess("synthetic", out=tmp_path, verbose=False,
               synthetic=SyntheticDataArgs(num_users=300, num_items=60, min_length=3, max_length=20))
    data = DatasetArgs(dataset_name="synthetic", max_sequence_length=8,
                       dataset_path=str(tmp_path / "synthetic"), shuffle=False)
    _, ev, _ = build_data(data, "retrieval", 16, 16, 0, 1, 0)
    ev.samples = replace(ev.samples, user=ev.samples.user.astype(np.int64) * 7_000_000_001)
    loader, used, total = eval_subset(ev, 40, 7)
    picked = loader.samples.user
    assert (used, total) == (40, 300) and len(set(picked.tolist())) == 40
    keys = _user_keys(ev.samples.user, 7)
    want = ev.samples.user[np.sort(np.argsort(keys, kind="stable")[:40])]
    assert np.array_equal(picked, want)
    assert np.array_equal(eval_subset(ev, 40, 7)[0].samples.user, picked)
    assert not np.array_equal(eval_subset(ev, 40, 8)[0].samples.user, picked)
