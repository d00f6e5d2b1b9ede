"""Random streams under tensor parallelism (Megatron's RNG-tracker contract, CPU and GPU).

Two streams per process:
- the default generator: the same on every rank of a TP group (the trainer seeds it so), used
  for everything replicated over the group (input dropout on the [T, D] tokens, which every TP
  rank must mask identically or the replicated parameters drift apart);
- the tensor-parallel stream, forked in around dropout on a sharded activation (a rank's
  heads of ``LayerNorm(O) * U``): seeded ``seed + 2718 + tp_rank`` so every shard gets its
  own mask, as if the full activation had one mask.

On CUDA this is Megatron-core's tracker (``model_parallel_cuda_manual_seed`` and
``get_cuda_rng_tracker().fork()``); Megatron's tracker only swaps CUDA generator states, so
on CPU the same contract is kept here by swapping the CPU generator's state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

TP_SEED_OFFSET = 2718  # Megatron's offset of the tensor-parallel seed


class _CpuTracker:
    def __init__(self) -> None:
        self.state: torch.Tensor | None = None

    def seed(self, seed: int) -> None:
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.state = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        assert self.state is not None, "seed_tensor_parallel was never called"
        saved = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)


_CPU = _CpuTracker()


def _use_cuda() -> bool:
    return torch.cuda.is_available()


def seed_tensor_parallel(seed: int, tp_rank: int) -> None:
    """Seeds this rank's tensor-parallel stream with ``seed + 2718 + tp_rank``."""
    if _use_cuda():
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.reset()
        default = torch.cuda.get_rng_state()
        name = tensor_parallel.random._MODEL_PARALLEL_RNG_TRACKER_NAME
        tracker.add(name, seed + TP_SEED_OFFSET + tp_rank)
        torch.cuda.set_rng_state(default)
    _CPU.seed(seed + TP_SEED_OFFSET + tp_rank)


@contextlib.contextmanager
def tensor_parallel_rng() -> Iterator[None]:
    """Draws inside this block come from the rank's own tensor-parallel stream."""
    if _use_cuda():
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            yield
    else:
        with _CPU.fork():
            yield


def tracker_state() -> dict:
    """The tensor-parallel stream's state, for checkpoints."""
    out: dict = {}
    if _CPU.state is not None:
        out["cpu"] = _CPU.state.clone()
    if _use_cuda() and _CPU.state is not None:  # seeded (TP > 1): Megatron's tracker holds it
        from megatron.core import tensor_parallel

        states = tensor_parallel.get_cuda_rng_tracker().get_states()
        if states:
            out["cuda"] = {k: v.clone() for k, v in states.items()}
    return out


def set_tracker_state(state: dict) -> None:
    if "cpu" in state:
        _CPU.state = state["cpu"].clone()
    if "cuda" in state and _use_cuda():
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda"])


__all__ = ["seed_tensor_parallel", "set_tracker_state", "tensor_parallel_rng", "tracker_state"]
