"""Where a CPU training process and its data thread run.

- :func:`pin_local_rank`: each of the host's LOCAL_WORLD_SIZE ranks gets its own equal slice
  of the host's CPUs (rank r: slice r), so a rank and its data thread share its cores and
  delay no other rank at the step's all-reduce. It is on only where it cannot hurt:
  a CPU run with more than one local rank, a CPU mask the launcher left whole (a mask
  smaller than the host's CPUs means srun --cpu-bind, numactl, taskset or torchrun
  --numa-binding placed the process already: it is left alone), and no other job on the host
  holding a claim in the per-host claims file (two jobs never pin onto the same cores; the
  first to start pins, the others run unpinned). Anything else: not pinned, one note.
- :func:`lower_this_thread`: the data thread runs at a low priority, so on its rank's cores
  it takes the time the training thread leaves instead of preempting it.

Both change only speed, never a value; the switches are in :mod:`hstu.training.host_settings`
and the measurements in docs/performance.md ("CPU placement").
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: host_settings imports this module when it applies
    from hstu.training.host_settings import HostSettings


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


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs of a kernel CPU list such as ``0-3,8,10-11``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read_cpu_list(path: str) -> set[int] | None:
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return None
    return parse_cpu_list(text) if text.strip() else None


def host_cpus() -> set[int]:
    """The CPUs this process could be given: the online CPUs, within the container's cpuset
    (cgroup v2 or v1) when there is one."""
    cpus = _read_cpu_list("/sys/devices/system/cpu/online") or set(range(os.cpu_count() or 1))
    for cpuset in ("/sys/fs/cgroup/cpuset.cpus.effective",
                   "/sys/fs/cgroup/cpuset/cpuset.effective_cpus"):
        limited = _read_cpu_list(cpuset)
        if limited:
            return cpus & limited
    return cpus


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _job_key() -> str:
    """Names this job among the host's: torchrun's store address is unique per live job."""
    return "{}:{}/{}".format(
        os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
        os.environ.get("TORCHELASTIC_RUN_ID", ""),
    )


def claim_cores(claims_file: str, cores: set[int]) -> str | None:
    """Claims ``cores`` for this job in the per-host ``claims_file`` (one line per pinned
    process: ``pid job cores``; lines of ended processes are dropped). Returns None when
    claimed, or why not: another live job claims one of them. Under an exclusive lock, so
    of two jobs starting at once exactly one wins."""
    job = _job_key()
    fd = os.open(claims_file, os.O_RDWR | os.O_CREAT, 0o666)
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        kept = []
        for line in fh.read().splitlines():
            fields = line.split(" ")
            if len(fields) != 3 or not fields[0].isdigit() or not _alive(int(fields[0])):
                continue
            kept.append(line)
            taken = parse_cpu_list(fields[2]) & cores
            if fields[1] != job and taken:
                return (f"cores {sorted(taken)} are claimed by another job on this host "
                        f"(pid {fields[0]}, {claims_file})")
        kept.append(f"{os.getpid()} {job} {','.join(map(str, sorted(cores)))}")
        fh.seek(0)
        fh.truncate()
        fh.write("\n".join(kept) + "\n")
    return None


def _note(message: str) -> None:
    print(f"[hstu] note: {message}: ranks not pinned to cores (HSTU_PIN_RANKS)",
          file=sys.stderr, flush=True)


def pin_local_rank(on_cpu: bool, settings: HostSettings | None = None) -> list[int] | None:
    """Restricts this process to its local rank's cores when that is safe (see the module
    docstring); returns them, or None when nothing was done. ``settings`` None: from the
    environment (:class:`hstu.training.host_settings.HostSettings`)."""
    if settings is None:
        from hstu.training.host_settings import HostSettings

        settings = HostSettings.from_env()
    if not on_cpu or not settings.pin_ranks or not hasattr(os, "sched_setaffinity"):
        return None  # Linux only
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    allowed = set(os.sched_getaffinity(0))
    whole = host_cpus()
    if allowed != whole:
        _note(f"the launcher restricted this process to CPUs {sorted(allowed)} of "
              f"{sorted(whole)} (a binding of its own)")
        return None
    mine = rank_cores(sorted(allowed), local_rank, local_world)
    if mine is None:
        _note(f"{local_world} local ranks on {len(allowed)} CPUs")
        return None
    taken = claim_cores(settings.cpu_claims_file, allowed)
    if taken is not None:
        _note(taken)
        return None
    # every thread the process has so far (an OpenMP pool may exist already); later ones inherit
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, mine)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return mine


def lower_this_thread(nice: int | None = None) -> int | None:
    """Sets the calling thread's niceness to ``nice`` (None: HSTU_FEED_NICE, default 19; 0
    leaves it) on Linux, where niceness is per thread; returns the niceness set, or None."""
    if nice is None:
        from hstu.training.host_settings import HostSettings

        nice = HostSettings.from_env().feed_nice
    if nice == 0 or not sys.platform.startswith("linux"):
        return None
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    return nice


__all__ = [
    "claim_cores", "host_cpus", "lower_this_thread", "parse_cpu_list", "pin_local_rank",
    "rank_cores",
]
