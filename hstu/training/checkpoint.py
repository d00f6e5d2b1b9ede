"""Checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<ckpt_save_dir>/iter_<step>/``:
- DCP files (``.metadata``, ``__<rank>_*.distcp``): the sharded state — embedding tables and
  their fused optimizer state — which DCP can load onto a different world size;
- ``dense_tp<r>.pt``: dense weights and the dense optimizer of tensor-parallel rank r (written
  by data-parallel rank 0 of that TP rank; replicated over data-parallel ranks);
- ``meta.pt``: step, data position, world sizes; ``rng_rank<r>.pt``: each rank's RNG states.

Everything is written into ``iter_<step>.tmp`` and renamed when all ranks are done, then
``latest`` (a one-line text file) is replaced atomically. A crash mid-save leaves at most a
``.tmp`` folder that is never loaded and is removed by the next save.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "latest"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    root: str,
    step: int,
    sharded_state: dict[str, Any],
    dense_state: dict[str, Any],
    meta: dict[str, Any],
    rng: dict[str, Any],
    rank: int,
    tp_rank: int,
    dp_rank: int,
) -> str:
    """Writes one checkpoint; all ranks call it. Returns the final directory."""
    final = os.path.join(root, f"iter_{step}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of an interrupted save
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.makedirs(tmp)
    _barrier()
    dcp.save(sharded_state, checkpoint_id=tmp)
    if dp_rank == 0:
        torch.save(dense_state, os.path.join(tmp, f"dense_tp{tp_rank}.pt"))
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        torch.save(meta, os.path.join(tmp, "meta.pt"))
    _barrier()
    if rank == 0:
        os.replace(tmp, final)
        latest_tmp = os.path.join(root, LATEST + ".tmp")
        with open(latest_tmp, "w") as fh:
            fh.write(os.path.basename(final) + "\n")
        os.replace(latest_tmp, os.path.join(root, LATEST))
    _barrier()
    return final


def resolve_checkpoint_dir(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the one its ``latest`` file names."""
    if os.path.isfile(os.path.join(path, "meta.pt")):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as fh:
            name = fh.read().strip()
        candidate = os.path.join(path, name)
        if os.path.isfile(os.path.join(candidate, "meta.pt")):
            return candidate
    raise FileNotFoundError(
        f"TrainerArgs.ckpt_load_dir={path!r}: no checkpoint there (no meta.pt and no '{LATEST}' "
        "file naming one)"
    )


def load_checkpoint(
    path: str,
    sharded_state: dict[str, Any],
    rank: int,
    tp_rank: int,
    tp_size: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Loads in place into ``sharded_state``; returns (dense_state, meta, rng or None).

    rng is None when this rank did not exist in the saved run (different world size).
    """
    ckpt = resolve_checkpoint_dir(path)
    meta = torch.load(os.path.join(ckpt, "meta.pt"), weights_only=False)
    if meta.get("tp_size", 1) != tp_size:
        raise ValueError(
            f"checkpoint {ckpt} was saved with tensor_model_parallel_size={meta.get('tp_size')} "
            f"but this run uses {tp_size}; resume with the same TP size"
        )
    dcp.load(sharded_state, checkpoint_id=ckpt)
    dense = torch.load(os.path.join(ckpt, f"dense_tp{tp_rank}.pt"), weights_only=False)
    rng_path = os.path.join(ckpt, f"rng_rank{rank}.pt")
    rng = torch.load(rng_path, weights_only=False) if os.path.exists(rng_path) else None
    return dense, meta, rng
