"""Tensor-parallel pieces of the HSTU block (Megatron-core linears, gloo or NCCL).

Legend: T jagged tokens, D hidden width, H heads, d head width, P = TP group size,
r = this rank's index in the TP group.

Layout of the fused projection W_uvqk (TP=1, shape [4*H*d, D], rows = outputs):
``[U heads 0..H-1 | V heads 0..H-1 | Q heads 0..H-1 | K heads 0..H-1]``, each head a block of
d rows. Megatron's ColumnParallelLinear keeps a contiguous row block per rank; on rank r that
block is laid out the same way over the rank's heads ``[r*H/P, (r+1)*H/P)``, so every rank holds
whole heads of U, V, Q and K. :func:`shard_uvqk` / :func:`unshard_uvqk` convert between the
two layouts (initialisation, tests, checkpoint conversion). W_o ([D, H*d]) is row-parallel:
its input columns are head-major, so rank r's contiguous column block is already its heads.

Batch gathering in the TP group: every rank looks up its own samples' embeddings; the dense
part runs on the concatenation of the TP group's samples (rank order) so that each rank's
head shard sees every sample; each rank then keeps its own samples' outputs.
:func:`all_gather_rows` / :func:`take_own_rows` do this with gradients that match the
objective ``sum over TP ranks of each rank's own loss``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed import ProcessGroup

from hstu.ops.gather import all_gather_uneven
from hstu.sync_audit import allowed_sync


def tp_size_of(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank_of(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# ------------------------------------------------------------------ weight layout helpers


def uvqk_shard_rows(num_heads: int, head_dim: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """int64 [4*H*d/P]: rows of the TP=1 W_uvqk that rank ``tp_rank`` holds, in its order."""
    if num_heads % tp_size != 0:
        raise ValueError(f"{num_heads} heads do not split over a TP group of {tp_size}")
    heads_per_rank = num_heads // tp_size
    width = num_heads * head_dim
    local = torch.arange(heads_per_rank * head_dim) + tp_rank * heads_per_rank * head_dim
    return torch.cat([part * width + local for part in range(4)])


def shard_uvqk(
    full: torch.Tensor, num_heads: int, head_dim: int, tp_size: int, tp_rank: int
) -> torch.Tensor:
    """TP=1 W_uvqk weight [4Hd, D] (or bias [4Hd]) -> rank's shard [4Hd/P, D] (or [4Hd/P])."""
    return full.index_select(
        0, uvqk_shard_rows(num_heads, head_dim, tp_size, tp_rank).to(full.device)
    )


def unshard_uvqk(shards: list[torch.Tensor], num_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`shard_uvqk`: every rank's shard, in rank order -> TP=1 tensor."""
    tp_size = len(shards)
    full = shards[0].new_empty((4 * num_heads * head_dim, *shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        full[uvqk_shard_rows(num_heads, head_dim, tp_size, rank).to(full.device)] = shard
    return full


def shard_output_weight(full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP=1 W_o weight [D, H*d] -> rank's column block [D, H*d/P]."""
    return full.chunk(tp_size, dim=1)[tp_rank]


def make_parallel_config(tp_size: int, params_dtype: torch.dtype):
    """A Megatron ModelParallelConfig for CPU-side init; we initialise weights ourselves."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        # Megatron would split a master weight contiguously, which is wrong for the fused
        # U/V/Q/K layout; the layer builds the TP=1 weight and loads its shard instead.
        perform_initialization=False,
        params_dtype=params_dtype,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


# ----------------------------------------------------------------- collective autograd ops


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum over the group in forward and backward (torch's functional all-reduce, whose
    backward all-reduces the gradient).

    For a replicated result consumed by rank-local (sharded) computation: each rank holds
    only its part of the gradient, the full gradient is the group sum. (Not
    ``torch.distributed.nn.functional.all_reduce``, the same op, deprecated in torch 2.13.)
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def _gather_counts(counts: list[int], group: ProcessGroup, device: torch.device) -> list[list[int]]:
    """Every rank's ``counts`` (rank order): one all-gather, then a host read of the result
    (a host sync on CUDA; the model path avoids it with sizes from the loader)."""
    mine = torch.tensor(counts, dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    with allowed_sync("TP row counts not known on the host: exchanged and read back"):
        return torch.stack(every).tolist()


def exchange_sizes(sizes: Any, group: ProcessGroup, device: torch.device) -> tuple[Any, ...]:
    """Every TP rank's batch sizes (an ``hstu.data.batch.BatchSizes``), rank order, for a
    batch that does not carry them (``Batch.tp_sizes``): one all-gather on ``device`` (the
    step's) and a host read."""
    # the counts (the compared fields; per-sample arrays, when a batch has them, stay local)
    fields = [getattr(sizes, f.name) for f in dataclasses.fields(sizes) if f.compare]
    return tuple(type(sizes)(*row) for row in _gather_counts(fields, group, device))


@dataclass(frozen=True)
class RowLayout:
    """Rows each TP rank contributed to a gathered tensor (rank order) and this rank."""

    counts: tuple[int, ...]
    rank: int

    @property
    def start(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.counts[self.rank]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: RowLayout, group: ProcessGroup) -> torch.Tensor:
        ctx.layout = layout
        return all_gather_uneven(x.contiguous(), list(layout.counts), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The dense part after the gather is replicated over the TP group and receives the
        # full gradient on every rank (see take_own_rows); keep our own rows.
        return grad[ctx.layout.start : ctx.layout.end], None, None


class _TakeOwnRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: RowLayout, group: ProcessGroup) -> torch.Tensor:
        ctx.layout, ctx.group = layout, group
        return x[layout.start : layout.end].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank's loss only touches its own rows; the replicated tensor's gradient under
        # the summed objective is every rank's rows side by side.
        full = all_gather_uneven(grad.contiguous(), list(ctx.layout.counts), ctx.group)
        return full, None, None


def all_gather_rows(
    x: torch.Tensor, group: ProcessGroup | None, layout: RowLayout | None = None
) -> tuple[torch.Tensor, RowLayout]:
    """[N_r, ...] on each rank -> ([sum_r N_r, ...], layout). Identity without a group.

    Differentiable: the gradient of this rank's rows is taken from the (replicated) gradient of
    the gathered tensor. Integer tensors pass through without autograd. ``layout`` (every
    rank's row count, known on the host) avoids exchanging the counts first (a host sync).
    """
    if group is None or dist.get_world_size(group) == 1:
        return x, RowLayout((x.shape[0],), 0)
    if layout is None:
        counts = _gather_counts([x.shape[0]], group, x.device)
        layout = RowLayout(tuple(c[0] for c in counts), dist.get_rank(group))
    if x.is_floating_point() and x.requires_grad:
        return _AllGatherRows.apply(x, layout, group), layout
    return all_gather_uneven(x.contiguous(), list(layout.counts), group), layout


def take_own_rows(x: torch.Tensor, layout: RowLayout, group: ProcessGroup | None) -> torch.Tensor:
    """[sum_r N_r, ...] replicated -> this rank's [N_r, ...]; backward all-gathers the grads."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    if x.is_floating_point() and x.requires_grad:
        return _TakeOwnRows.apply(x, layout, group)
    return x[layout.start : layout.end]


__all__ = [
    "RowLayout",
    "all_gather_rows",
    "all_reduce_sum",
    "exchange_sizes",
    "make_parallel_config",
    "shard_output_weight",
    "shard_uvqk",
    "take_own_rows",
    "tp_rank_of",
    "tp_size_of",
    "unshard_uvqk",
    "uvqk_shard_rows",
]
