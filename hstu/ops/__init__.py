"""HSTU attention kernels behind one function: pytorch (reference), triton, cutlass.

Legend: T total tokens of the jagged batch, B samples, H heads, d head dim, N
``scaling_seqlen``. The mask is documented in ``hstu.ops.masks`` and docs/kernels.md.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from hstu.ops.backends import BackendUnavailableError, resolve_backend
from hstu.ops.jagged import lengths_to_offsets
from hstu.ops.masks import MASK_CONVENTIONS, AttentionOptions, dense_mask
from hstu.ops.rab import NUM_TIME_BUCKETS, RelativeAttentionBias, time_bucket
from hstu.registry import ATTENTION_BACKENDS, load
from hstu.sync_audit import allowed_sync

__all__ = [
    "MASK_CONVENTIONS",
    "MAX_SEQLEN_CHECK",
    "NUM_TIME_BUCKETS",
    "AttentionOptions",
    "BackendUnavailableError",
    "RelativeAttentionBias",
    "dense_mask",
    "hstu_attention",
    "lengths_to_offsets",
    "max_seqlen_checked_here",
    "resolve_backend",
    "time_bucket",
]


MAX_SEQLEN_CHECK = (
    "max_seqlen against the longest sample: free on host offsets, on CUDA only when "
    "HSTU_CHECK_MAX_SEQLEN=1 asks for it"
)


def max_seqlen_checked_here(offsets: Tensor) -> bool:
    """Whether ``hstu_attention`` compares ``max_seqlen`` with the longest sample.

    Finding the longest sample reads the lengths on the host: free for CPU offsets, a
    device-to-host sync per call for CUDA ones, which would stall the CPU once per layer.
    So on CUDA it is checked only with HSTU_CHECK_MAX_SEQLEN=1 (debugging); unchecked, the
    triton kernel writes NaN into the rows past ``max_seqlen`` (a non-finite loss, never
    silent zeros) and the pytorch backend computes them (it takes lengths from offsets).
    """
    if offsets.device.type == "cpu":
        return True
    return os.environ.get("HSTU_CHECK_MAX_SEQLEN", "0") not in ("", "0")


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    max_seqlen: int,
    *,
    backend: str = "pytorch",
    strict: bool = False,
    **options: Any,
) -> Tensor:
    """Jagged HSTU attention: O = A V with A = SiLU(alpha Q K^T + rab) / N, masked.

    Args:
        q, k, v: [T, H, d] jagged values (v may have another d for the pytorch backend).
        offsets: int64 [B + 1] sample boundaries, offsets[0] = 0, offsets[B] = T.
        max_seqlen: >= the longest sample of this batch (a stable dataset-wide bound is fine);
            a smaller one is refused where that is cheap to check (``max_seqlen_checked_here``).
        backend: a name of ``hstu.registry.ATTENTION_BACKENDS`` ("pytorch" | "triton" |
            "cutlass"); see ``resolve_backend`` for fallbacks.
        strict: raise instead of falling back to another backend.
        **options: the fields of ``AttentionOptions`` (``alpha`` and ``scaling_seqlen``
            required; the mask, the relative bias and the window), passed on to the backend.

    Returns:
        [T, H, d_v] in q's dtype.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k, v must be [T, H, d] (v: [T, H, d_v]); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be int64 [B + 1], got shape {tuple(offsets.shape)}")
    call = AttentionOptions(**options)
    if offsets.numel() > 1 and max_seqlen_checked_here(offsets):
        with allowed_sync(MAX_SEQLEN_CHECK):
            longest = int((offsets[1:] - offsets[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(
                f"hstu_attention: max_seqlen={max_seqlen} is smaller than the longest sample "
                f"({longest} tokens); pass a bound >= every sample's length"
            )
    if call.rab is not None:
        call.rab.validate(q.shape[0], max_seqlen, offsets.numel() - 1)
    chosen = resolve_backend(
        backend,
        q.shape[2],
        q.device,
        strict,
        value_head_dim=v.shape[2],
        dtype=q.dtype,
        causal=call.causal,
        has_targets=call.num_targets is not None,
    )
    return load(ATTENTION_BACKENDS[chosen].impl)(q, k, v, offsets, max_seqlen, **options)
