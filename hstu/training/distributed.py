"""Process groups, Megatron parallel state, devices and seeds for one run."""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hstu.training.cpu_placement import pin_local_rank
from hstu.training.host_memory import keep_freed_host_memory
from hstu.training.host_settings import HostSettings


@dataclass
class DistEnv:
    """Where this process sits. DP = world / TP; ranks of one TP group are consecutive.
    Without tensor parallelism (``tp_size`` 1) both groups are None: the DP group is the
    default group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(device: torch.device) -> str:
    """The default process group's backend for a run whose step runs on ``device``: on a GPU
    host NCCL for CUDA tensors and gloo for host ones (docs/training.md, "Launching")."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def apply_host_settings(settings: HostSettings, on_cpu: bool, restart_count: int) -> None:
    """Applies the process-wide host settings at start-up, before the process group exists:
    the allocator, the CPU placement (CPU runs), and the restart backoff (a restarted
    attempt)."""
    keep_freed_host_memory(settings.keep_freed_host_memory)
    # before the process group's threads start: they inherit the mask
    pin_local_rank(on_cpu, settings)
    wait = settings.restart_wait_s(restart_count)
    if wait > 0:
        time.sleep(wait)


def init_distributed(tp_size: int = 1, timeout_s: int = 600) -> DistEnv:
    """Initialises torch.distributed (:func:`process_group_backend`: NCCL for CUDA tensors and
    gloo for host tensors on GPUs, gloo on CPU) and, with ``tp_size`` > 1, Megatron's TP/DP
    groups (at 1 the DP group is the default group: ``tp_group`` and ``dp_group`` None).

    Works under torchrun (RANK/WORLD_SIZE set) and as a single plain process (a world of 1
    on a free local port). First applies the process-wide host settings
    (:mod:`hstu.training.host_settings`: allocator, CPU placement, restart backoff).
    """
    settings = HostSettings.from_env()
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    apply_host_settings(settings, on_cpu=device.type == "cpu", restart_count=restart_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend=process_group_backend(device), rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s), store=_attempt_store(world_size, timeout_s),
        )
    if world_size % tp_size != 0:
        raise ValueError(
            f"TensorModelParallelArgs.tensor_model_parallel_size={tp_size} does not divide the "
            f"world size {world_size}"
        )
    if tp_size == 1:
        # no tensor parallelism: the data-parallel group is the whole world (the default
        # group), and Megatron is not imported at all (its package import alone takes seconds:
        # it compiles its fused helpers)
        return DistEnv(
            rank=rank, world_size=world_size, local_rank=local_rank, device=device,
            backend=dist.get_backend(), tp_size=1, tp_rank=0, dp_size=world_size,
            dp_rank=rank, tp_group=None, dp_group=None,
        )
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() != tp_size:
        # groups left by an earlier run in this process with another TP size: build them anew
        ps.destroy_model_parallel()
        _drop_megatron_groups(ps)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
        tp_size=tp_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
    )


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the world size) of the default group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (pickled over the default group)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    holder = [obj]
    if rank_and_world()[1] > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _attempt_store(world_size: int, timeout_s: int) -> dist.Store | None:
    """Under torchrun, the job's store with a prefix per restart, so that an attempt never
    reads the gloo addresses a killed one left there (docs/failures.md, "Resuming and
    supervised runs").
    None (the default env:// store) outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"/hstu/attempt_{restart_count()}", store)


def destroy_distributed() -> None:
    """Tears down Megatron's groups and every process group; safe to call twice or after failure.

    Call it after dropping the model, optimizers and trainer (anything that holds a process
    group), so that the groups are really freed here, while the interpreter is still fully
    alive: freeing a gloo group stops and joins its worker threads. ``destroy_process_group``
    only unregisters the groups (gloo has no ``shutdown``); a group still referenced from
    elsewhere (TorchRec's ShardingEnv, sharded modules and fused optimizers, our hooks) keeps
    its threads running until interpreter exit. Such a thread may still be releasing the
    last collective's work after ``wait()`` returned; when that drops the last reference to
    a tensor created in Python it must take the GIL, and if the interpreter is finalizing by
    then the thread is ended inside the noexcept work destructor: ``terminate called without
    an active exception`` and SIGABRT, after a run that otherwise succeeded.
    """
    ps = sys.modules.get("megatron.core.parallel_state")  # never imported: nothing to tear down
    if ps is not None:
        try:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
        except Exception:  # noqa: BLE001, S110 - cleanup must not mask the original error
            pass
        _drop_megatron_groups(ps)
    if dist.is_initialized():
        # TorchRec's sharded modules sit in reference cycles: collect them first so that the
        # groups' last references go away in destroy_process_group (see above).
        gc.collect()
        dist.destroy_process_group()


def _drop_megatron_groups(ps: Any) -> None:
    """Resets parallel_state globals that still hold process groups after its teardown.

    megatron-core 0.16.1's destroy_model_parallel() leaves
    _INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP and its _GLOO twin set (aliases of the
    data-parallel-with-CP groups), which would keep those groups and their gloo threads alive
    until interpreter exit (see destroy_distributed). Every such global starts as None.
    """

    def holds_group(value: Any) -> bool:
        if isinstance(value, dist.ProcessGroup):
            return True
        return isinstance(value, (list, tuple)) and any(
            isinstance(v, dist.ProcessGroup) for v in value
        )

    for name, value in list(vars(ps).items()):
        if name.startswith("_") and name.isupper() and holds_group(value):
            setattr(ps, name, None)


def set_seed(seed: int) -> None:
    """The same seed on every rank: weights are drawn identically everywhere (TP ranks keep
    their shard of the TP=1 draw)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_training_rng(seed: int, env: DistEnv, step: int = 0, per_rank: bool = True) -> None:
    """Random streams for training (dropout), after the weights are built (hstu.model.rng;
    docs/training.md, "Gradient semantics"): with several ranks (or ``step`` > 0) the default
    generator is re-seeded, the same on every rank of a TP group, plus ``1_000_003 * dp_rank``
    with ``per_rank`` (``TrainerArgs.dropout_per_rank``); the tensor-parallel stream adds
    ``2718 + tp_rank``. ``base`` is ``seed + 7919 * step``: ``step`` > 0 re-seeds a rank that
    did not exist in a resumed run."""
    from hstu.model.rng import seed_tensor_parallel

    base = seed + 7919 * step
    if per_rank:
        base += 1_000_003 * env.dp_rank
    if env.world_size > 1 or step > 0:
        torch.manual_seed(base)
        if torch.cuda.is_available():
            torch.cuda.manual_seed(base)
    if env.tp_size > 1:
        seed_tensor_parallel(base, env.tp_rank)


def rng_state() -> dict:
    """All RNG states of this process, for checkpoints."""
    from hstu.model.rng import tracker_state

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tensor_parallel": tracker_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("tensor_parallel"):
        from hstu.model.rng import set_tracker_state

        set_tracker_state(state["tensor_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
