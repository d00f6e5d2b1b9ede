"""2-rank gloo: sharded lookups and one fused optimizer step equal a single-process reference."""

from __future__ import annotations

import torch

from tests.dist_utils import run_multiprocess
from tests.embeddings.common import (
    DIM,
    UPSTREAM,
    build,
    kjt,
    lookup,
    optimizer,
    slice_samples,
    tables,
    train_step,
)

GLOBAL_BATCH = {
    "a": [[0, 5, 23], [5], [17, 2], [11, 11, 12]],
    "b": [[1], [9, 1], [0], [3]],
}


def _grad(rows: int, ids: list[list[int]], world_size: int = 2) -> torch.Tensor:
    """Gradient of the global batch, averaged over ranks (TorchRec's and DDP's convention)."""
    g = torch.zeros(rows, DIM)
    for sample in ids:
        for i in sample:
            g[i] += UPSTREAM
    return g / world_size


def _reference_step(weight: torch.Tensor, grad: torch.Tensor, name: str, lr: float) -> torch.Tensor:
    """The update a plain torch optimizer makes on the dense weight."""
    w = torch.nn.Parameter(weight.clone())
    w.grad = grad.clone()
    if name == "sgd":
        torch.optim.SGD([w], lr=lr).step()
    elif name == "adam":
        torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999), eps=1e-8).step()
    elif name == "rowwise_adagrad":
        # no torch class: w -= lr * g / (sqrt(mean(g^2)) + eps), row by row
        state = grad.pow(2).mean(dim=1, keepdim=True)
        with torch.no_grad():
            w -= lr * grad / (state.sqrt() + 1e-8)
    return w.detach()


def _all_rows(rows_a: int, rows_b: int) -> dict[str, list[list[int]]]:
    return {"a": [list(range(rows_a))], "b": [list(range(rows_b))]}


def _body(rank: int, world_size: int) -> None:
    cases = [("sgd", "row_wise"), ("sgd", "table_wise"), ("rowwise_adagrad", "row_wise"),
             ("rowwise_adagrad", "table_wise")]
    for opt_name, override in cases:
        tbls = tables()
        opt = optimizer(opt_name)
        ref, _ = build(tbls, opt, sharded=False)
        emb, plan = build(tbls, opt, sharded=True, overrides={"ta": override})
        kinds = {p.table: p.sharding_type for p in plan}
        assert kinds == {"ta": override, "tb": "data_parallel"}, kinds
        assert {p.table: p.ranks for p in plan}["tb"] == [0, 1]
        # identical lookups before training, for this rank's own batch
        local = slice_samples(GLOBAL_BATCH, rank, world_size)
        got, want = lookup(emb, local), lookup(ref, local)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        # one fused step on 2 ranks == plain optimizer on the dense weight, global batch
        train_step(emb, kjt(local))
        after = lookup(emb, _all_rows(24, 10))
        for feature, table, rows in (("a", "ta", 24), ("b", "tb", 10)):
            w0 = (ref.dp_ec if table == "tb" else ref.ec).embeddings[table].weight.detach()
            expect = _reference_step(w0, _grad(rows, GLOBAL_BATCH[feature]), opt_name, 0.5)
            torch.testing.assert_close(after[feature], expect, rtol=1e-5, atol=1e-6,
                                       msg=f"{opt_name}/{override} table {table}")
    # data_parallel table alone with adam (row-sparse torch Adam fused into backward)
    tbls = tables()[1:]
    opt = optimizer("adam")
    ref, _ = build(tbls, opt, sharded=False)
    emb, _ = build(tbls, opt, sharded=True)
    local = {"b": slice_samples(GLOBAL_BATCH, rank, world_size)["b"]}
    train_step(emb, kjt(local))
    after = lookup(emb, {"b": [list(range(10))]})["b"]
    expect = _reference_step(ref.dp_ec.embeddings["tb"].weight.detach(), _grad(10, GLOBAL_BATCH["b"]), "adam", 0.5)
    torch.testing.assert_close(after, expect, rtol=1e-5, atol=1e-6)


def test_sharded_lookups_and_fused_step_match_reference() -> None:
    run_multiprocess(_body, world_size=2)
