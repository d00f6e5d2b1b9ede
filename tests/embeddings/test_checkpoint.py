"""The tables' part of a checkpoint (TableState through the checkpoint files): save on 2
ranks -> load on 1, and 1 -> 2: identical lookups, also after one more step."""

from __future__ import annotations

import os

import torch

from hstu.training.checkpoint import CheckpointState, RankPlace, load_checkpoint, save_checkpoint
from hstu.training.checkpoint_manager import TableState
from tests.dist_utils import run_multiprocess
from tests.embeddings.common import build, kjt, lookup, optimizer, slice_samples, tables, train_step

BIG = 2**63 - 1


def _batch(step: int) -> dict[str, list[list[int]]]:
    """A global batch of 4 samples, the same for any world size (ranks take slices)."""
    base = [BIG - step, -(2**62) + step, 7 * step + 1, 12345678901234 + step]
    return {
        "a": [[step % 24, 3], [5], [(2 * step) % 24], [11, 11]],
        "b": [[step % 10], [9, 1], [0], [3]],
        "c": [[base[0], base[1]], [base[2]], [base[3], base[0]], [base[1] + 1]],
    }


def _query() -> dict[str, list[list[int]]]:
    last = _batch(3)["c"]
    seen = sorted({i for s in last for i in s})
    return {"a": [list(range(24))], "b": [list(range(10))], "c": [seen + [424242]]}


def _make():
    tbls = tables(dynamic_capacity=8)
    emb, _ = build(tbls, optimizer("rowwise_adagrad", lr=0.1), sharded=True)
    return emb


def _train(emb, steps: range, rank: int, world: int) -> None:
    for step in steps:
        # x world size: the mean over ranks then equals the global-batch gradient
        train_step(emb, kjt(slice_samples(_batch(step), rank, world)), scale=float(world))


def _save(rank: int, world_size: int, tmp: str) -> None:
    emb = _make()
    _train(emb, range(3), rank, world_size)
    assert emb.stats()["tc"]["evicted_total"] > 0  # the checkpoint holds eviction state
    meta = {"step": 3, "world_size": world_size, "tp_size": 1}
    state = CheckpointState(TableState(emb).state_dict(), {}, meta, {})
    save_checkpoint(os.path.join(tmp, "ckpt"), 3, state, RankPlace(rank, 0, rank))
    before = lookup(emb, _query())
    _train(emb, range(3, 4), rank, world_size)  # one more step: exercises optimizer state
    after = lookup(emb, _query())
    if rank == 0:
        torch.save({"before": before, "after": after}, os.path.join(tmp, "expected.pt"))


def _load(rank: int, world_size: int, tmp: str) -> None:
    emb = _make()
    tables = TableState(emb)
    sharded = tables.state_dict()
    load_checkpoint(os.path.join(tmp, "ckpt"), sharded, RankPlace(rank, 0, rank))
    tables.load_state_dict(sharded)
    expected = torch.load(os.path.join(tmp, "expected.pt"))
    got = lookup(emb, _query())
    for k, v in expected["before"].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"loaded lookup {k}")
    _train(emb, range(3, 4), rank, world_size)
    got = lookup(emb, _query())
    for k, v in expected["after"].items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"next step {k}")


def test_save_two_ranks_load_one(tmp_path) -> None:
    run_multiprocess(_save, world_size=2, tmp=str(tmp_path))
    run_multiprocess(_load, world_size=1, tmp=str(tmp_path))


def test_save_one_rank_load_two(tmp_path) -> None:
    run_multiprocess(_save, world_size=1, tmp=str(tmp_path))
    run_multiprocess(_load, world_size=2, tmp=str(tmp_path))
