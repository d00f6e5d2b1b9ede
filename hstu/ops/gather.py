"""Rows of every rank on every rank, with gradients back to their owner: the all-gathers of
uneven row counts that in-batch negatives (the model), the split full-corpus loss
(hstu.ops.losses.vocab_parallel) and tensor parallelism (hstu.model.tensor_parallel) share.

One process scores each query against the positives of its whole batch; with W ranks each
holds 1/W of the global batch, so the in-batch (and mixed) losses all-gather every rank's
positives (vectors with gradients, ids) before scoring, and a rank's queries see the same
negatives as in one process. The data shards samples over the world (not over the DP group:
under TP every rank loads its own samples), so the group is the world.

Counts differ per rank (jagged): each rank's row count is a host number
(``Batch.sizes.num_queries``), all-gathered on the host (:class:`PendingCounts`, launched
before the forward and waited for at the loss; no device -> host copy), then the rows are
padded to the largest count for one all-gather. Backward all-reduces the gradient of the
gathered rows and keeps this rank's slice: the sum over every rank's queries of the
gradient on each positive reaches the rank that owns it (whose tables then take the world
mean, as for every other gradient: hstu.model.loss_scale).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from hstu.sync_audit import allowed_sync

HOST_COUNTS = "the ranks' query counts, all-gathered as host tensors: no device to wait for"


def world_of_several() -> bool:
    """Whether the default process group spans more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


class PendingCounts:
    """Every rank's ``count`` (a host int), all-gathered over the world from a host tensor;
    launched here, read with :meth:`wait`. A CPU tensor takes the group's host backend
    (gloo; ``"cpu:gloo,cuda:nccl"`` on GPU hosts): no device is involved."""

    def __init__(self, count: int) -> None:
        world = dist.get_world_size()
        self._parts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        self._work = dist.all_gather(
            self._parts, torch.tensor([count], dtype=torch.int64), async_op=True
        )
        self._counts: list[int] | None = None

    def wait(self) -> list[int]:
        """Every rank's count, in rank order."""
        if self._counts is None:
            self._work.wait()
            with allowed_sync(HOST_COUNTS):
                self._counts = [int(p[0]) for p in self._parts]
        return self._counts


def all_gather_uneven(x: torch.Tensor, counts: list[int], group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's x (first dim = counts[rank]) in rank order."""
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)


def _all_gather_padded(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's ``x`` ([counts[r], ...], rank order) concatenated: [sum(counts), ...]."""
    assert x.shape[0] == counts[dist.get_rank()], "Batch.sizes does not describe the batch"
    if max(counts) == 0:  # every rank agrees: no rows anywhere
        return x.new_zeros((0, *x.shape[1:]))
    return all_gather_uneven(x.contiguous(), counts, None)  # None: the world


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows in rank order; backward: the gradient summed over the ranks,
    this rank's slice (an all-reduce of [sum(counts), D]; a reduce-scatter would move half the
    bytes, but gloo has none for unequal sizes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.counts = counts
        return _all_gather_padded(x, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank = dist.get_rank()
        start = sum(ctx.counts[:rank])
        if max(ctx.counts) == 0:  # every rank agrees: nothing was gathered
            return grad.new_zeros((0, *grad.shape[1:])), None
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[start : start + ctx.counts[rank]], None


def gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's ``x`` [counts[r], ...] concatenated in rank order, [sum(counts), ...];
    gradients flow back to the rank that owns each row when ``x`` requires them.
    ``counts``: :meth:`PendingCounts.wait`, the same list on every rank."""
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, counts)
    return _all_gather_padded(x, counts)


__all__ = ["HOST_COUNTS", "PendingCounts", "all_gather_uneven", "gather_rows", "world_of_several"]
