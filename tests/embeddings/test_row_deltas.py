"""Row deltas of the embedding tables (hstu.embeddings.row_deltas; online training's delta
checkpoints, docs/online.md "Checkpoints: bases and deltas").

A row-wise sharded table, a replicated one and a dynamic one (row-wise Adagrad) trained on 2
ranks: a base with whole tables, then 2 row deltas (the rows looked up since, each written once
by the rank holding it). Restored from base + deltas on 2 ranks and on 1 (resharded), every
weight and optimizer state equals the uninterrupted run's checkpoint of the same step bitwise,
and so does the state after one more step. A delta's table bytes are the touched rows' worth.
"""

from __future__ import annotations

import os

import torch

from hstu.embeddings import embedding_state_dict
from hstu.embeddings.collection import apply_misses
from hstu.embeddings.row_deltas import (
    TouchedRows,
    entries_bytes,
    row_keys,
    table_rows,
    touched_entries,
)
from hstu.training import checkpoint as ckpt
from hstu.training.checkpoint import CheckpointState, RankPlace, save_checkpoint
from hstu.training.checkpoint_manager import TableState, load_tables, split_rows
from tests.dist_utils import run_multiprocess
from tests.embeddings.common import UPSTREAM, build, kjt, optimizer, slice_samples, tables

ROWS = 4096  # table ta: far more rows than a delta touches


def _make():
    emb, _ = build(tables(mp_rows=ROWS, dynamic_capacity=8), optimizer("rowwise_adagrad", 0.1),
                   sharded=True, overrides={"ta": "row_wise"})
    return emb


def _batch(step: int) -> dict[str, list[list[int]]]:
    """A global batch of 4 samples (ranks take slices): a few rows of each table."""
    a = [(step * 37 + 5 * k) % ROWS for k in range(6)]
    return {
        "a": [[a[0], a[1]], [a[2]], [a[3], ROWS - 1 - step], [a[4], a[5]]],
        "b": [[step % 10], [9, 1], [0], [3]],
        "c": ([[7], [5], [7], [5]] if step in (7, 8) else
              [[100 + step, 7], [200 + 2 * step], [7, 300 + step], [5]]),
    }


def _step(emb, touched: TouchedRows | None, step: int, rank: int, world: int) -> None:
    """One training step as the trainer runs it: input stage (remap, admissions), rows noted
    on the host, lookup, backward (the fused optimizers step). Steps 7 and 8 look up only
    ids 7 and 5 of the dynamic table (8 rows), and at step 8 the 3 rows last used before step 6
    expire: no step since the checkpoint at 6 looked them up, they stay free until the delta at
    9, which must write them (step 9 admits new ids into them)."""
    emb.train()
    for remapper in emb.remappers.values():  # event time = the step
        remapper.set_clock(step)
        if step == 8:
            assert remapper.expire(before=6) == 3
    features, misses = emb.remap(kjt(slice_samples(_batch(step), rank, world)))
    if touched is not None:
        touched.note(features)
    out = apply_misses(emb(features), misses)
    loss = float(world) * sum((jt.values() * UPSTREAM).sum() for jt in out.values())
    loss.backward()


def _meta(step: int, world: int) -> dict:
    return {"step": step, "world_size": world, "tp_size": 1}


def _save_run(rank: int, world_size: int, tmp: str) -> None:
    """Steps 0-8; a base at 3, row deltas at 6 and 9 (root "delta"); the uninterrupted run's
    whole checkpoint at 9 (root "full")."""
    emb = _make()
    tables_ = TableState(emb)
    touched = TouchedRows(emb)
    place = RankPlace(rank, 0, rank)
    delta_root = os.path.join(tmp, "delta")
    chain: list[str] = []
    for step in range(9):
        _step(emb, touched, step, rank, world_size)
        if step + 1 not in (3, 6, 9):
            continue
        sharded = tables_.state_dict()
        rows_state = None
        if chain:
            union, problem = touched.union()
            assert problem is None, problem
            state = embedding_state_dict(emb)
            rows_state, problem = touched_entries(state, row_keys(emb, state), table_rows(emb),
                                                  union, rank)
            assert problem is None, problem
            split_rows(tables_, sharded)
        needs = {os.path.basename(c): ckpt.manifest_crc(c) for c in chain}
        path = save_checkpoint(delta_root, step + 1, CheckpointState(
            sharded, {}, _meta(step + 1, world_size), {}, needs=needs, table_rows=rows_state),
            place)
        chain.append(path)
        touched.clear()
    save_checkpoint(os.path.join(tmp, "full"), 9, CheckpointState(
        tables_.state_dict(), {}, _meta(9, world_size), {}), place)


def _local(state: dict) -> dict[str, list[torch.Tensor]]:
    """This rank's pieces of every entry (comparable between two models of one world)."""
    return {k: [s.tensor for s in v.local_shards()] if hasattr(v, "local_shards") else [v]
            for k, v in state.items()}


def _assert_same(a: dict, b: dict, where: str) -> None:
    assert set(a) == set(b), where
    for key, pieces in a.items():
        for x, y in zip(pieces, b[key], strict=True):
            assert torch.equal(x, y), f"{where}: {key}"


def _restore_and_compare(rank: int, world_size: int, tmp: str) -> None:
    place = RankPlace(rank, 0, rank)
    restored, reference = _make(), _make()
    assert ckpt.table_links(os.path.join(tmp, "delta", "iter_9")) == (
        os.path.join(tmp, "delta", "iter_3"),
        [os.path.join(tmp, "delta", "iter_6"), os.path.join(tmp, "delta", "iter_9")])
    load_tables(os.path.join(tmp, "delta", "iter_9"), TableState(restored), place)
    load_tables(os.path.join(tmp, "full", "iter_9"), TableState(reference), place)
    _assert_same(_local(embedding_state_dict(reference)), _local(embedding_state_dict(restored)),
                 "restored")
    for step in (9, 10):  # the next steps (admissions into evicted slots too)
        _step(restored, None, step, rank, world_size)
        _step(reference, None, step, rank, world_size)
    _assert_same(_local(embedding_state_dict(reference)), _local(embedding_state_dict(restored)),
                 "after two more steps")


def test_row_deltas_restore_bitwise_on_two_ranks_and_resharded_on_one(tmp_path) -> None:
    run_multiprocess(_save_run, world_size=2, tmp=str(tmp_path))
    delta = tmp_path / "delta"
    # a delta's DCP part holds no table rows; its rows files hold each touched row once
    files = sorted((delta / "iter_6").glob("table_rows.rank*.pt"))
    assert [p.name for p in files] == ["table_rows.rank0.pt", "table_rows.rank1.pt"]
    parts = [torch.load(p, weights_only=False) for p in files]
    rows_a = [p["tables.embeddings.ta.weight"]["rows"] for p in parts]
    assert all(r.numel() > 0 for r in rows_a)  # row-wise: both ranks hold touched rows of ta
    every = torch.cat(rows_a)
    assert every.unique().numel() == every.numel()  # each row once
    touched_a = {r for s in (3, 4, 5) for sample in _batch(s)["a"] for r in sample}
    assert set(every.tolist()) == touched_a
    assert set(parts[1]) < set(parts[0])  # the replicated table: rank 0 only
    assert "dp_tables.embeddings.tb.weight" in parts[0]
    # bytes: the touched rows' worth (row index, D weights, one momentum each), far below ta whole
    payload = entries_bytes(parts[0]) + entries_bytes(parts[1])
    per_row_a = 8 + 4 * 4 + (8 + 4)  # weight entry: index + D floats; momentum: index + 1 float
    assert sum(entries_bytes({k: v for k, v in p.items() if ".ta." in k}) for p in parts) == \
        per_row_a * len(touched_a)
    on_disk = sum(p.stat().st_size for p in files)
    assert on_disk < payload + 12 * 1024, (on_disk, payload)  # + a fixed pickle overhead
    base = sum(p.stat().st_size for p in (delta / "iter_3").glob("*.distcp"))
    assert on_disk * 8 < base, (on_disk, base)
    # the dynamic table's per-row state travels as rows (rank 0: it is replicated), the rows
    # freed by the expiry at step 8 with it
    at9 = [torch.load(p, weights_only=False) for p in sorted((delta / "iter_9").glob(
        "table_rows.rank*.pt"))]
    occupied = at9[0]["remappers.tc.occupied"]
    assert "remappers.tc.occupied" not in at9[1]
    assert int((~occupied["values"]).sum()) == 3, occupied
    run_multiprocess(_restore_and_compare, world_size=2, tmp=str(tmp_path))
    run_multiprocess(_restore_and_compare, world_size=1, tmp=str(tmp_path))
