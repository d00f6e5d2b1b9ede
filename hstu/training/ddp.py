"""Data-parallel gradient sync of the dense module: torch DistributedDataParallel over the DP
group, bucketed all-reduce launched from backward hooks as buckets fill (overlapping the rest
of backward), with a communication hook that sets the gradient semantics.

The hook divides each bucket by the WORLD size (TP x DP), not the DP size, before summing over
the DP group: under tensor parallelism every TP rank's dense gradient already holds the whole
TP group's losses (the dense part runs on the group's gathered samples), so the result is
the gradient of the global-batch mean loss, exactly as the tables get theirs
(:mod:`hstu.model.loss_scale`). Half-precision buckets are reduced in float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class HookState:
    group: dist.ProcessGroup | None
    world_size: int
    launches: list[tuple[float, int]] = field(default_factory=list)
    """(time, bucket index) of every bucket all-reduce launched, when ``record`` is on."""
    record: bool = False


def mean_over_world_hook(state, bucket):  # unannotated: DDP checks the annotations
    """DDP communication hook (state: :class:`HookState`, bucket: ``dist.GradBucket``)."""
    if state.record:
        state.launches.append((time.perf_counter(), bucket.index()))
    buf = bucket.buffer()
    if buf.dtype in (torch.float16, torch.bfloat16):
        work = buf.float().div_(state.world_size)
        fut = dist.all_reduce(work, group=state.group, async_op=True).get_future()

        def back(f: torch.futures.Future) -> torch.Tensor:
            buf.copy_(f.value()[0])
            return buf

        return fut.then(back)
    buf.div_(state.world_size)
    fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_dense(
    dense: nn.Module,
    dp_group: dist.ProcessGroup | None,
    world_size: int,
    bucket_cap_mb: float = 25.0,
) -> DistributedDataParallel:
    """``dense`` in DistributedDataParallel over ``dp_group`` with the world-mean hook."""
    ddp = DistributedDataParallel(
        dense,
        device_ids=None,  # inputs are already where the module is; DDP must not copy them
        process_group=dp_group,
        bucket_cap_mb=bucket_cap_mb,
        # the dense modules hold no buffers: nothing to broadcast per forward (the default)
        find_unused_parameters=False,
    )
    state = HookState(dp_group, world_size)
    ddp.register_comm_hook(state, mean_over_world_hook)
    ddp.hstu_hook_state = state  # type: ignore[attr-defined]
    return ddp


__all__ = ["HookState", "mean_over_world_hook", "wrap_dense"]
