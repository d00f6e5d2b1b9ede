"""Where a CPU training process and its data thread run: :func:`pin_local_rank` gives each
local rank its own equal slice of the host's CPUs where that cannot hurt (the conditions and
the per-host claims file: docs/training.md, "Host settings"), :func:`lower_this_thread`
runs the data thread at a low priority. Both change only speed, never a value; the
switches are in :mod:`hstu.training.host_settings`, the measurements in docs/performance.md
("Knobs").
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading

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


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), None when it is
    gone; with the pid it names one process, also after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def _job_key() -> str:
    """Names this job among the host's: torchrun's store address is unique per live job."""
    return "{}:{}/{}".format(
        os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
        os.environ.get("TORCHELASTIC_RUN_ID", ""),
    )


def _set_all_threads(pid: int, cores: set[int] | list[int]) -> None:
    """Sets the CPU mask of every thread process ``pid`` has now; later ones inherit it."""
    task_dir = f"/proc/{pid}/task"
    tids = [int(t) for t in os.listdir(task_dir)] if os.path.isdir(task_dir) else [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def register_job(claims_file: str, cores: set[int], mine: list[int] | None) -> str | None:
    """Registers this process in the per-host ``claims_file`` and pins it to ``mine`` (None:
    not pinned) when no other job runs on ``cores``. Returns None when pinned as asked, or
    why not.

    One line per CPU training process with pinning on: ``pid start-time job pinned cores``.
    A job that finds another's live process on its cores does not pin, and unpins the
    other's (docs/training.md, "Host settings"). All under the file's exclusive lock: of two
    jobs starting at once, the second sees the first's pinned line."""
    job = _job_key()
    try:
        fd = os.open(claims_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # e.g. another user's file: unknown neighbours, so no pinning
        return f"cannot open the claims file {claims_file} ({exc.strerror})"
    try:
        os.fchmod(fd, 0o666)  # other users' jobs register in the same file
    except PermissionError:  # not ours: its owner chose its mode
        pass
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        entries: list[list[str]] = []
        for line in fh.read().splitlines():
            fields = line.split(" ")
            if len(fields) != 5 or not fields[0].isdigit():
                continue
            if _start_time(int(fields[0])) != fields[1]:  # ended (or its pid was reused)
                continue
            entries.append(fields)
        others = [e for e in entries if e[2] != job and parse_cpu_list(e[4]) & cores]
        why = None
        if others:
            why = (f"another job runs on these cores (pid {others[0][0]}, {claims_file}); "
                   "neither is pinned")
            for e in others:
                if e[3] == "1":
                    try:
                        _set_all_threads(int(e[0]), parse_cpu_list(e[4]))
                    except PermissionError:  # another user's job keeps its pinning
                        continue
                    e[3] = "0"
        elif mine is not None:
            _set_all_threads(os.getpid(), mine)
        pinned = "1" if mine is not None and why is None else "0"
        entries.append([str(os.getpid()), _start_time(os.getpid()) or "?", job, pinned,
                        ",".join(map(str, sorted(cores)))])
        fh.seek(0)
        fh.truncate()
        fh.write("".join(" ".join(e) + "\n" for e in entries))
    return why


def _note(message: str) -> None:
    print(f"[hstu] note: {message}: ranks not pinned to cores (HSTU_PIN_RANKS)",
          file=sys.stderr, flush=True)


def pin_local_rank(on_cpu: bool, settings: HostSettings | None = None) -> list[int] | None:
    """Restricts this process to its local rank's cores when that is safe (see the module
    docstring); returns them, or None when nothing was done. ``settings`` None: from the
    environment (:class:`hstu.training.host_settings.HostSettings`)."""
    if settings is None:
        settings = HostSettings.from_env()
    if not on_cpu or not settings.pin_ranks or not hasattr(os, "sched_setaffinity"):
        return None  # Linux only
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    allowed = set(os.sched_getaffinity(0))
    whole = host_cpus()
    mine = None
    if local_world <= 1:
        pass  # nothing to share; registered all the same, as a neighbour of pinned jobs
    elif allowed != whole:
        _note(f"the launcher restricted this process to CPUs {sorted(allowed)} of "
              f"{sorted(whole)} (a binding of its own)")
    else:
        mine = rank_cores(sorted(allowed), local_rank, local_world)
        if mine is None:
            _note(f"{local_world} local ranks on {len(allowed)} CPUs")
    why = register_job(settings.cpu_claims_file, allowed, mine)
    if why is not None and mine is not None:
        _note(why)
    return mine if why is None else None


def lower_this_thread(nice: int | None = None) -> int | None:
    """Sets the calling thread's niceness to ``nice`` (None: HSTU_FEED_NICE, default 19; 0
    leaves it) on Linux, where niceness is per thread; returns the niceness set, or None."""
    if nice is None:
        nice = HostSettings.from_env().feed_nice
    if nice == 0 or not sys.platform.startswith("linux"):
        return None
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    return nice


__all__ = [
    "host_cpus", "lower_this_thread", "parse_cpu_list", "pin_local_rank", "rank_cores",
    "register_job",
]
