"""The pieces of a (possibly sharded) table a rank holds, and writes of rows into them.

Used when tables are built (each rank writes its shards' starting values, see
:func:`hstu.embeddings.collection.initialise_tables`) and by dynamic tables when an id is
admitted into a slot: the slot's row gets the id's fresh values and its optimizer state
(Adam moments, row-wise Adagrad sum) restarts at 0, so nothing of the evicted id leaks
into the new one.
Legend: M rows to write, D embedding dim, r x c a local piece at global offsets (r0, c0).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel


def _pieces(value: object) -> list[tuple[torch.Tensor, list[int]]]:
    """(local tensor, global offsets) of a ShardedTensor's local shards, or of a whole tensor."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(s.tensor, list(s.metadata.shard_offsets)) for s in value.local_shards()]
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return [(value, [0] * value.dim())]
    return []


def local_pieces(emb: nn.Module, table: str) -> list[tuple[torch.Tensor, list[int]]]:
    """The weight pieces of ``table`` this rank holds in an HstuEmbeddings: (local [r, c],
    [r0, c0]) per local shard of the sharded collection (none when the table lives on other
    ranks), or the whole weight at [0, 0] (replicated or unsharded). The tensors alias the
    table's storage (for FBGEMM kernels, the kernel's weights)."""
    dp_ec = emb.dp_ec
    if dp_ec is not None and table in dp_ec.embeddings:
        return [(dp_ec.embeddings[table].weight.data, [0, 0])]
    if isinstance(emb.ec, DistributedModelParallel):
        return _pieces(emb.ec.module.state_dict()[f"embeddings.{table}.weight"])
    return [(emb.ec.embeddings[table].weight.data, [0, 0])]


def _write_local(
    local: torch.Tensor, offsets: list[int], slots: torch.Tensor, rows: torch.Tensor | None
) -> None:
    """Writes the part of rows [M, D] (or zeros when rows is None) that a piece holds.

    local: the piece [r, c] (or [r] for row-wise optimizer state) at global offsets.
    Integer index ops only (no boolean-mask indexing, no read of a device value on the
    host): every slot is written, those outside the piece redirected onto the first slot
    inside it with that slot's own value (equal duplicates, so the write order does not
    matter), or, when none is inside, onto row 0 with its current value. ``slots`` must
    be distinct.
    """
    n = local.shape[0]
    if n == 0 or slots.numel() == 0:
        return
    slots = slots.to(local.device)
    local_rows = slots - offsets[0]
    inside = (local_rows >= 0) & (local_rows < n)  # [M]
    first = torch.argmax(inside.to(torch.int8))  # the first slot inside (0 if none)
    any_inside = inside[first]
    target_first = torch.where(any_inside, local_rows[first], 0)
    targets = torch.where(inside, local_rows, target_first)
    if rows is None:
        values = torch.zeros(
            (slots.numel(), *local.shape[1:]), dtype=local.dtype, device=local.device
        )
    else:
        c0 = offsets[1] if len(offsets) > 1 else 0
        values = rows[:, c0 : c0 + local.shape[1]].to(local.device, local.dtype)
    fill = torch.where(any_inside, values[first], local[0])  # one row
    keep = inside.view(-1, *([1] * (local.dim() - 1)))
    local.index_copy_(0, targets, torch.where(keep, values, fill))


def _write_sharded(value: object, slots: torch.Tensor, rows: torch.Tensor | None) -> None:
    for local, offsets in _pieces(value):
        _write_local(local, offsets, slots, rows)


@torch.no_grad()
def write_table_rows(ec: nn.Module, table: str, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """ec[table][slots] = rows [M, D]; optimizer state of those rows = 0.

    ec: a TorchRec EmbeddingCollection, or one sharded by DistributedModelParallel (each
    rank writes the rows its local shards hold; every rank must pass the same slots).
    """
    key = f"embeddings.{table}.weight"
    if isinstance(ec, DistributedModelParallel):
        # Local shards of the state dict alias the FBGEMM kernel's weights and states.
        weight = ec.module.state_dict()[key]
        _write_sharded(weight, slots, rows)
        for name, state in ec.fused_optimizer.state_dict()["state"].items():
            if name.endswith(key) or name == key:
                for value in state.values():
                    _write_sharded(value, slots, None)
        return
    weight = ec.embeddings[table].weight
    _write_local(weight.data, [0, 0], slots, rows)
    for opt in getattr(weight, "_in_backward_optimizers", []):
        for value in opt.state.get(weight, {}).values():
            per_row = isinstance(value, torch.Tensor) and value.dim() >= 1
            if per_row and value.shape[0] == weight.shape[0]:
                _write_local(value, [0] * value.dim(), slots, None)
