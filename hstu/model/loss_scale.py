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


def global_mean_scale(count: torch.Tensor, training: bool) -> torch.Tensor:
    """Factor turning this rank's sum of per-target losses into its share of the global mean.

    ``count``: this rank's number of targets (a 0-d tensor, stays on the device: no host sync).
    Outside training (or in one process): 1 / local count.
    """
    count = count.detach().to(torch.float32).reshape(1)
    if training and dist.is_initialized() and dist.get_world_size() > 1:
        total = count.clone()
        dist.all_reduce(total)
        return (dist.get_world_size() / total.clamp(min=1.0)).squeeze(0)
    return (1.0 / count.clamp(min=1.0)).squeeze(0)


__all__ = ["global_mean_scale"]
