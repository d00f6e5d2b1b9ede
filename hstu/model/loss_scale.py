"""One gradient semantics for every TP x DP layout: the loss of a step is the mean over the
targets of the whole global batch.

A rank's loss is ``sum of its per-target losses * W / N`` (W ranks, N targets in the world):
the mean of these over the ranks is the global-batch mean, whatever the ranks' target counts.
Tables average their gradients over the world (TorchRec, and the replicated tables' hook);
the dense DDP divides its sum over the data-parallel group by W (``hstu.training.ddp``):
under tensor parallelism each TP rank's dense gradient already holds its whole group's
losses. So TP=2 x DP=1, TP=1 x DP=2 and one process take the same step for one global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class PendingScale:
    """:func:`global_mean_scale` with its all-reduce launched now and waited for in
    :meth:`wait`: started before the forward, the ranks meet there only if one is a whole
    forward behind (a rank would otherwise wait at the loss for the slower one's forward)."""

    def __init__(self, count: torch.Tensor, training: bool) -> None:
        self._count = count.detach().to(torch.float32).reshape(1)
        self._work = None
        self._world = 1
        if training and dist.is_initialized() and dist.get_world_size() > 1:
            self._world = dist.get_world_size()
            self._count = self._count.clone()
            self._work = dist.all_reduce(self._count, async_op=True)

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return (self._world / self._count.clamp(min=1.0)).squeeze(0)


def global_mean_scale(count: torch.Tensor, training: bool) -> torch.Tensor:
    """Factor turning this rank's sum of per-target losses into its share of the global mean.

    ``count``: this rank's number of targets (a 0-d tensor, stays on the device: no host sync).
    Outside training (or in one process): 1 / local count.
    """
    return PendingScale(count, training).wait()


__all__ = ["PendingScale", "global_mean_scale"]
