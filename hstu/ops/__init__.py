"""HSTU attention kernels behind one function: pytorch (reference), triton, cutlass.

Legend: T total tokens of the jagged batch, B samples, H heads, d head dim, N
``scaling_seqlen``. The mask is documented in ``hstu.ops.masks`` and docs/kernels.md.
"""

from __future__ import annotations

import inspect
import os

from torch import Tensor

from hstu.ops.backends import BACKENDS, BackendUnavailableError, resolve_backend, triton_module
from hstu.ops.masks import (
    MASK_CONVENTIONS,
    check_mask_convention,
    check_window,
    dense_mask,
    lengths_from_offsets,
    offsets_from_lengths,
)
from hstu.ops.rab import NUM_TIME_BUCKETS, RelativeAttentionBias, time_bucket
from hstu.registry import ATTENTION_BACKENDS, load
from hstu.sync_audit import allowed_sync

__all__ = [
    "BACKENDS",
    "MASK_CONVENTIONS",
    "MAX_SEQLEN_CHECK",
    "NUM_TIME_BUCKETS",
    "BackendUnavailableError",
    "RelativeAttentionBias",
    "dense_mask",
    "hstu_attention",
    "lengths_from_offsets",
    "max_seqlen_checked_here",
    "offsets_from_lengths",
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
    alpha: float,
    scaling_seqlen: int,
    causal: bool = True,
    num_contextual: Tensor | None = None,
    num_targets: Tensor | None = None,
    target_group_size: int = 1,
    rab: RelativeAttentionBias | None = None,
    mask_convention: str = "hstu",
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    backend: str = "pytorch",
    strict: bool = False,
) -> Tensor:
    """Jagged HSTU attention: O = A V with A = SiLU(alpha Q K^T + rab) / N, masked.

    Args:
        q, k, v: [T, H, d] jagged values (v may have another d for the pytorch backend).
        offsets: int64 [B + 1] sample boundaries, offsets[0] = 0, offsets[B] = T.
        max_seqlen: >= the longest sample of this batch (a stable dataset-wide bound is fine);
            a smaller one is refused where that is cheap to check (``max_seqlen_checked_here``).
        alpha: scale on Q K^T (1/sqrt(d) production, 1.0 research model).
        scaling_seqlen: N, the SiLU output is divided by it.
        causal: key j <= query i outside the contextual block.
        num_contextual: int64 [B], leading tokens of each sample that see each other fully.
        num_targets: int64 [B], trailing candidate tokens of each sample.
        target_group_size: candidates per target group (>= 1).
        rab: optional relative attention bias inputs (computed inside the kernel).
        mask_convention: "hstu" (ours) or "peer" (Meta's and NVIDIA's: contextual rows see
            the whole non-candidate history; without ``causal`` non-candidates see the
            candidates); ``hstu.ops.masks``, docs/model.md "Mask conventions".
        max_attn_len: W, the semi-local window (0: full attention): a pair the mask allows
            is kept only within W positions, the rule of ``hstu.ops.masks``.
        min_full_attn_seq_len: M (needs W > 0): the last M history rows and the candidates
            keep the whole history.
        backend: a name of ``hstu.registry.ATTENTION_BACKENDS`` ("pytorch" | "triton" |
            "cutlass"); see ``resolve_backend`` for fallbacks.
        strict: raise instead of falling back to another backend.

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
    if target_group_size < 1:
        raise ValueError(f"target_group_size must be >= 1, got {target_group_size}")
    if scaling_seqlen <= 0:
        raise ValueError(f"scaling_seqlen must be > 0, got {scaling_seqlen}")
    check_mask_convention(mask_convention)
    check_window(max_attn_len, min_full_attn_seq_len)
    if offsets.numel() > 1 and max_seqlen_checked_here(offsets):
        with allowed_sync(MAX_SEQLEN_CHECK):
            longest = int((offsets[1:] - offsets[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(
                f"hstu_attention: max_seqlen={max_seqlen} is smaller than the longest sample "
                f"({longest} tokens); pass a bound >= every sample's length"
            )
    if rab is not None:
        rab.validate(q.shape[0], max_seqlen, offsets.numel() - 1)
    chosen = resolve_backend(
        backend,
        q.shape[2],
        q.device,
        strict,
        value_head_dim=v.shape[2],
        dtype=q.dtype,
        causal=causal,
        has_targets=num_targets is not None,
    )
    kwargs = {
        "alpha": alpha,
        "scaling_seqlen": scaling_seqlen,
        "causal": causal,
        "num_contextual": num_contextual,
        "num_targets": num_targets,
        "target_group_size": target_group_size,
        "rab": rab,
        "mask_convention": mask_convention,
    }
    kernel = load(ATTENTION_BACKENDS[chosen].impl)
    if chosen == "pytorch":
        kwargs["max_attn_len"] = max_attn_len
        kwargs["min_full_attn_seq_len"] = min_full_attn_seq_len
    else:
        # the other kernels get the window only when it is on, and must take it
        for name, value in (("max_attn_len", max_attn_len),
                            ("min_full_attn_seq_len", min_full_attn_seq_len)):
            if value:
                if name not in _parameters(chosen, kernel):
                    raise ValueError(
                        f"hstu_attention: backend {chosen!r} does not take {name} yet; use "
                        f"backend='pytorch' or {name}=0"
                    )
                kwargs[name] = value
    return kernel(q, k, v, offsets, max_seqlen, **kwargs)


def _parameters(name: str, kernel) -> set[str]:
    """The keyword parameters of a backend's kernel (triton: the kernel of the module the
    registry's wrapper forwards to)."""
    if name == "triton":
        kernel = triton_module().triton_hstu_attention
    return set(inspect.signature(kernel).parameters)
