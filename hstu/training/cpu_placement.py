"""Where a CPU training process and its data thread run.

Data-parallel ranks on one CPU host meet at every step (the gradient all-reduce), so a step
lasts as long as the slowest rank's. Each rank also has a data thread (hstu.training.feed)
that builds batches ahead: ~15 ms of numpy per batch on the ML-1M recipe. Left to the
scheduler, a rank's data thread runs on whichever core is free at the moment, often the
other rank's, which then arrives late at the all-reduce while the first waits: measured on
the 2-core machine, the ranks' arrival times differed by 24-29 ms per step on average (a
~190 ms step).

- ``pin_local_rank``: each of the host's LOCAL_WORLD_SIZE ranks gets its own equal slice of
  the process's CPUs (rank r: slice r), so a rank and its data thread share its cores and
  delay no other rank. Only on CPU runs with more than one local rank; skipped (with a note)
  when there are fewer CPUs than ranks.
- ``lower_this_thread``: the data thread runs at nice 19, so on its rank's cores it takes
  the time the training thread leaves (the waits at collectives, at the GIL, at the data
  queue) instead of preempting it; with a batch not ready the training thread blocks on
  the queue and the data thread gets the core.

Both change only speed, never a value. ML-1M recipe on ML-100K, DP=2 on 2 cores, side by
side: 1,116-1,323 samples/s without, 1,371-1,458 with both (docs/performance.md).
Switches: ``HSTU_PIN_RANKS=0``, ``HSTU_FEED_NICE=0`` (or another niceness).
"""

from __future__ import annotations

import os
import sys
import threading


def rank_cores(cores: list[int], local_rank: int, local_world: int) -> list[int] | None:
    """Local rank ``local_rank``'s slice of ``cores`` (sorted, split into ``local_world``
    equal slices; the remainder goes unused); None when there are fewer cores than ranks."""
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise ValueError(f"local rank {local_rank} is not in a local world of {local_world}")
    cores = sorted(cores)
    per = len(cores) // local_world
    if per == 0:
        return None
    return cores[local_rank * per:(local_rank + 1) * per]


def pin_local_rank(on_cpu: bool) -> list[int] | None:
    """Restricts this process to its local rank's cores (see the module docstring); returns
    them, or None when nothing was done."""
    if not on_cpu or os.environ.get("HSTU_PIN_RANKS", "1") == "0":
        return None
    if not hasattr(os, "sched_setaffinity"):  # Linux only
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    allowed = sorted(os.sched_getaffinity(0))
    mine = rank_cores(allowed, local_rank, local_world)
    if mine is None:
        print(
            f"[hstu] note: {local_world} local ranks on {len(allowed)} CPUs: ranks not pinned "
            "to cores (HSTU_PIN_RANKS)",
            file=sys.stderr, flush=True,
        )
        return None
    # every thread the process has so far (an OpenMP pool may exist already); later ones inherit
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, mine)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return mine


def lower_this_thread() -> int | None:
    """Sets the calling thread's niceness to ``HSTU_FEED_NICE`` (default 19; 0 leaves it) on
    Linux, where niceness is per thread; returns the niceness set, or None."""
    nice = int(os.environ.get("HSTU_FEED_NICE", "19"))
    if nice == 0 or not sys.platform.startswith("linux"):
        return None
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    return nice


__all__ = ["lower_this_thread", "pin_local_rank", "rank_cores"]
