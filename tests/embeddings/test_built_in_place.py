"""Tables built where they live: each rank allocates only its shards, the starting values
are the same bitwise for 1 and 2 processes and any sharding, and the memory check per rank
from the plan refuses on 1 process what fits on 2, before anything is allocated."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from hstu.args import DynamicEmbeddingArgs, EmbeddingArgs, OptimizerArgs
from hstu.embeddings import build_embedding_collection, shard_embeddings
from hstu.embeddings.collection import tables_on_meta
from hstu.embeddings.rows import local_pieces
from hstu.validation import ConfigError
from tests.dist_utils import run_multiprocess

SEED = 5
ROWS = 40
# column_wise needs a dim TorchRec splits in columns (128-wide pieces); one collection, one dim
DIMS = dict.fromkeys(("row", "col", "whole", "twin", "repl", "dyn"), 256)
OVERRIDES = {"row": "row_wise", "col": "column_wise", "whole": "table_wise", "twin": "row_wise"}


def _tables() -> list[EmbeddingArgs]:
    out: list[EmbeddingArgs] = [
        EmbeddingArgs(feature_names=[f"f_{name}"], table_name=name, item_vocab_size_or_capacity=ROWS,
                      sharding_type="model_parallel")
        for name in ("row", "col", "whole", "twin")
    ]
    out.append(EmbeddingArgs(feature_names=["f_repl"], table_name="repl", item_vocab_size_or_capacity=ROWS,
                             sharding_type="data_parallel"))
    out.append(DynamicEmbeddingArgs(feature_names=["f_dyn"], table_name="dyn",
                                    item_vocab_size_or_capacity=10**12, item_vocab_gpu_capacity=ROWS))
    return out


def _optimizer() -> OptimizerArgs:
    return OptimizerArgs(optimizer_str="sgd", learning_rate=0.1, sparse_optimizer_str="rowwise_adagrad")


def _gather_tables(emb, world_size: int) -> dict[str, torch.Tensor]:
    """Every table assembled whole from every rank's local pieces (offsets from the shards)."""
    out = {}
    for name, spec in emb.specs.items():
        mine = [(offsets, piece.clone()) for piece, offsets in local_pieces(emb, name)]
        every: list = [None] * world_size
        dist.all_gather_object(every, mine)
        full = torch.full((spec.num_rows, spec.embedding_dim), float("nan"))
        for pieces in every:
            for (r0, c0), piece in pieces:
                full[r0:r0 + piece.shape[0], c0:c0 + piece.shape[1]] = piece
        out[name] = full
    return out


def _build_and_gather(rank: int, world_size: int, tmp: str) -> None:
    tbls = _tables()
    emb = build_embedding_collection(tbls, DIMS, "cpu", seed=SEED, sparse_optimizer="rowwise_adagrad",
                                     materialize=False)
    assert tables_on_meta(emb)
    emb, plan = shard_embeddings(emb, tbls, _optimizer(), "cpu", sharding_overrides=OVERRIDES)
    assert not tables_on_meta(emb)
    kinds = {p.table: p.sharding_type for p in plan}
    assert kinds == {"row": "row_wise", "col": "column_wise", "whole": "table_wise", "twin": "row_wise",
                     "dyn": kinds["dyn"], "repl": "data_parallel"}, kinds
    if world_size == 2:
        # each rank holds only its shards: half of a row-wise table, half of the columns of
        # a column-wise one, all or nothing of a table-wise one; a replicated table whole
        held = {name: sum(p.numel() for p, _ in local_pieces(emb, name)) for name in DIMS}
        assert held["row"] == ROWS * DIMS["row"] // 2, held
        assert held["col"] == ROWS * DIMS["col"] // 2, held
        assert held["whole"] in (0, ROWS * DIMS["whole"]), held
        assert held["repl"] == ROWS * DIMS["repl"], held
    full = _gather_tables(emb, world_size)
    if rank == 0:
        torch.save(full, os.path.join(tmp, f"tables_{world_size}.pt"))


def test_starting_weights_are_bitwise_the_same_on_1_and_2_processes(tmp_path) -> None:
    run_multiprocess(_build_and_gather, world_size=1, tmp=str(tmp_path))
    run_multiprocess(_build_and_gather, world_size=2, tmp=str(tmp_path))
    one = torch.load(tmp_path / "tables_1.pt")
    two = torch.load(tmp_path / "tables_2.pt")
    # and the unsharded build (whole tables written in one process)
    whole = build_embedding_collection(_tables(), DIMS, "cpu", seed=SEED, sparse_optimizer="rowwise_adagrad")
    assert set(one) == set(two) == set(DIMS)
    for name in DIMS:
        assert not one[name].isnan().any(), f"{name}: a piece of the 1-process table is missing"
        assert not two[name].isnan().any(), f"{name}: a piece of the 2-process table is missing"
        assert torch.equal(one[name], two[name]), f"table {name}: 1 vs 2 processes"
        ec = whole.dp_ec if name == "repl" else whole.ec
        assert torch.equal(ec.embeddings[name].weight.detach(), two[name]), f"table {name}: unsharded vs 2"
    # the values are the documented range, and two tables of the same shape are not copies
    bound = ROWS ** -0.5
    assert one["row"].abs().max() <= bound and one["row"].std() > bound / 3
    assert not torch.equal(one["row"], one["twin"])
    # another seed, other values
    other = build_embedding_collection(_tables(), DIMS, "cpu", seed=SEED + 1, sparse_optimizer="rowwise_adagrad")
    assert not torch.equal(other.ec.embeddings["row"].weight.detach(), one["row"])


# --------------------------------------------------------------------- memory check

BIG_ROWS, BIG_DIM = 1 << 20, 16  # 64 MiB of float32 values, SGD: no optimizer state
MIB = 2**20


def _big() -> list[EmbeddingArgs]:
    return [EmbeddingArgs(feature_names=["f"], table_name="big", item_vocab_size_or_capacity=BIG_ROWS,
                          sharding_type="model_parallel")]


def _sgd() -> OptimizerArgs:
    return OptimizerArgs(optimizer_str="sgd", learning_rate=0.1, sparse_optimizer_str="sgd")


# Whole: 64 MiB; a row-wise half: 32 MiB; the init chunk (1M values at <= 48 B) at most
# 48 MiB either way: 96 MiB fits a half, not the whole.
AVAILABLE = 96 * MIB


def _fit(rank: int, world_size: int, tmp: str, available: list[int]) -> None:
    emb = build_embedding_collection(_big(), {"big": BIG_DIM}, "cpu", seed=SEED, sparse_optimizer="sgd",
                                     materialize=False)
    try:
        shard_embeddings(emb, _big(), _sgd(), "cpu", sharding_overrides={"big": "row_wise"},
                         available=(available[rank], "set by the test"))
    except ConfigError as exc:
        # refused before anything was allocated: the tables are still on the meta device
        assert tables_on_meta(emb) and not hasattr(emb.ec, "plan")
        with open(os.path.join(tmp, f"refused_{world_size}_{rank}.txt"), "w") as fh:
            fh.write(str(exc))
        return
    held = sum(p.numel() for p, _ in local_pieces(emb, "big"))
    assert held == BIG_ROWS * BIG_DIM // world_size


def test_the_memory_check_refuses_on_1_process_what_fits_on_2(tmp_path) -> None:
    run_multiprocess(_fit, world_size=1, tmp=str(tmp_path), available=[AVAILABLE])
    line = (tmp_path / "refused_1_0.txt").read_text()
    assert "\n" not in line and line.startswith("EmbeddingArgs: rank 0 of 1 would hold")
    assert "values 64.0 MiB" in line and "has 96.0 MiB (set by the test)" in line
    run_multiprocess(_fit, world_size=2, tmp=str(tmp_path), available=[AVAILABLE, AVAILABLE])
    assert not list(tmp_path.glob("refused_2_*"))
    # one rank short of memory: both refuse together (no rank left waiting in a collective)
    run_multiprocess(_fit, world_size=2, tmp=str(tmp_path), available=[AVAILABLE, 16 * MIB])
    for rank in (0, 1):
        line = (tmp_path / f"refused_2_{rank}.txt").read_text()
        assert "rank 1 of 2 would hold" in line and "values 32.0 MiB" in line, line


@pytest.mark.parametrize("rows,dim", [(10, 4), (3 * 2**20 + 7, 3)])
def test_a_piece_is_written_chunk_by_chunk_as_the_whole_table(rows: int, dim: int) -> None:
    from hstu.embeddings.collection import (
        INIT_CHUNK_VALUES,
        TableSpec,
        initial_rows,
        write_initial_rows,
    )

    spec = TableSpec("t", ("f",), rows, dim, False, "model_parallel")
    whole = initial_rows(0, rows, spec, SEED)
    # a piece at (r0, c0) spanning several chunks equals the same piece of the whole table
    r0, c0 = rows // 3, 1
    piece = torch.empty(rows - r0, dim - 1)
    write_initial_rows(piece, [r0, c0], spec, SEED)
    assert torch.equal(piece, whole[r0:, c0:])
    assert rows * dim < INIT_CHUNK_VALUES or piece.numel() > 2 * INIT_CHUNK_VALUES


def test_row_writes_touch_only_the_piece_s_own_slots() -> None:
    from hstu.embeddings.rows import _write_local

    base = torch.arange(24, dtype=torch.float32).view(6, 4)  # a piece of rows [10, 16)
    rows = -torch.arange(1, 4 * 5 + 1, dtype=torch.float32).view(5, 4)
    # slots 3 and 20 lie outside the piece; 15, 10 and 12 inside (piece rows 5, 0, 2)
    local = base.clone()
    _write_local(local, [10, 0], torch.tensor([3, 15, 20, 10, 12]), rows)
    want = base.clone()
    want[5], want[0], want[2] = rows[1], rows[3], rows[4]
    assert torch.equal(local, want)
    # none inside: unchanged; zeros (optimizer state) likewise only inside
    local = base.clone()
    _write_local(local, [10, 0], torch.tensor([0, 30]), rows[:2])
    assert torch.equal(local, base)
    state = torch.ones(6)
    _write_local(state, [10], torch.tensor([3, 11]), None)
    assert torch.equal(state, torch.tensor([1.0, 0, 1, 1, 1, 1]))
