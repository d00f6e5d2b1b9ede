"""Write rows of a (possibly sharded) table in place, and reset their optimizer state.

Used by dynamic tables when an id is admitted into a slot: the slot's row gets the id's
fresh values and its optimizer state (Adam moments, row-wise Adagrad sum) restarts at 0,
so nothing of the evicted id leaks into the new one.
Legend: M rows to write, D embedding dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel


def _write_local(local: torch.Tensor, offsets: list[int], slots: torch.Tensor, rows: torch.Tensor | None) -> None:
    """Writes the part of rows [M, D] (or zeros when rows is None) that a shard holds.

    local: the shard [r, c] (or [r] for row-wise optimizer state) at global offsets.
    """
    r0 = offsets[0]
    sel = (slots >= r0) & (slots < r0 + local.shape[0])
    if not bool(sel.any()):
        return
    local_rows = (slots[sel] - r0).to(local.device)
    if rows is None:
        local[local_rows] = 0
        return
    c0 = offsets[1] if len(offsets) > 1 else 0
    local[local_rows] = rows[sel][:, c0 : c0 + local.shape[1]].to(local.device, local.dtype)


def _write_sharded(value: object, slots: torch.Tensor, rows: torch.Tensor | None) -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            _write_local(shard.tensor, list(shard.metadata.shard_offsets), slots, rows)
    elif isinstance(value, torch.Tensor) and value.dim() >= 1:
        _write_local(value, [0] * value.dim(), slots, rows)


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
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == weight.shape[0]:
                _write_local(value, [0] * value.dim(), slots, None)

