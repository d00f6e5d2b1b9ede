"""HSTU attention masks and small jagged helpers.

Legend: B samples, T total tokens (jagged), L[b] tokens of sample b, n the padded width of a
group of samples, C[b] contextual tokens (``num_contextual``), G[b] candidates
(``num_targets``), g ``target_group_size``.

Two conventions (``mask_convention``, docs/model.md "Mask conventions"). Token i of a sample
may attend token j (both in [0, L)) iff

"hstu" (ours, the default):

    (i < C and j < C)                                    # contextual block, both directions
    or (causal_ok(i, j) and candidate_rule(i, j))

    causal_ok(i, j)      = j <= i            (causal=True)  | True (causal=False)
    candidate_rule(i, j) = j < L - G                              (j is not a candidate)
                           or (i >= L - G and group(i) == group(j))
    group(t)             = (t - (L - G)) // g                     (for candidates only)

"peer" (Meta's generative-recommenders and NVIDIA's recsys-examples):

    (i < C and j < L - G)                                # contextual rows: every non-candidate
    or (causal_ok(i, j) and peer_candidate_rule(i, j))

    peer_candidate_rule(i, j) = j < L - G or i < L - G or group(i) == group(j)

So under "hstu" a non-candidate never sees a candidate, a candidate sees every (earlier, when
causal) non-candidate and the (earlier, when causal) members of its own group, and contextual
tokens see the contextual block only. Under "peer" contextual rows see the whole
non-candidate history (later history reaches earlier positions through them from the second
layer on), and without the causal mask every non-candidate also sees every candidate. With
the causal mask and no contextual tokens the two are the same mask. We assume C + G <= L (a
token is never both).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK_CONVENTIONS = ("hstu", "peer")


def check_mask_convention(mask_convention: str) -> None:
    """Refuse a name that is not in ``MASK_CONVENTIONS`` (one line)."""
    if mask_convention not in MASK_CONVENTIONS:
        raise ValueError(
            f"mask_convention must be one of {list(MASK_CONVENTIONS)}, got {mask_convention!r}"
        )


def allowed(
    i: int,
    j: int,
    length: int,
    num_contextual: int,
    num_targets: int,
    target_group_size: int,
    causal: bool,
    mask_convention: str = "hstu",
) -> bool:
    """The mask rule for one (query i, key j) pair of one sample, in plain Python.

    Deliberately written as the docstring above states it, for tests and documentation.
    """
    check_mask_convention(mask_convention)
    peer = mask_convention == "peer"
    if i >= length or j >= length:
        return False
    first_candidate = length - num_targets
    contextual_keys = first_candidate if peer else num_contextual
    if i < num_contextual and j < contextual_keys:
        return True
    if causal and j > i:
        return False
    if j < first_candidate:
        return True
    if i < first_candidate:
        return peer
    return (i - first_candidate) // target_group_size == (j - first_candidate) // target_group_size


def dense_mask(
    lengths: Tensor,
    num_contextual: Tensor | None,
    num_targets: Tensor | None,
    target_group_size: int,
    causal: bool,
    width: int,
    mask_convention: str = "hstu",
) -> Tensor:
    """Vectorised mask for a padded group of samples.

    Args:
        lengths: int64 [b] tokens per sample (each <= width).
        num_contextual: int64 [b] or None (no contextual tokens).
        num_targets: int64 [b] or None (no candidates).
        target_group_size: candidates per target group (>= 1).
        causal: keep j <= i outside the contextual block.
        width: n, the padded width.
        mask_convention: "hstu" | "peer" (the module docstring).

    Returns:
        bool [b, n, n]: ``mask[s, i, j]`` says whether query i of sample s sees key j.
        Rows and columns at or beyond ``lengths[s]`` are all False.
    """
    check_mask_convention(mask_convention)
    peer = mask_convention == "peer"
    device = lengths.device
    pos = torch.arange(width, device=device)
    i = pos.view(1, width, 1)
    j = pos.view(1, 1, width)
    length = lengths.view(-1, 1, 1)
    valid = (i < length) & (j < length)
    if causal:
        rule = j <= i
    else:
        rule = torch.ones(1, width, width, dtype=torch.bool, device=device)
    if num_targets is not None:
        first_candidate = length - num_targets.view(-1, 1, 1)
        i_cand = i >= first_candidate
        j_cand = j >= first_candidate
        # clamp keeps floor division on non-negative numbers; only used where both are candidates
        group_i = (i - first_candidate).clamp(min=0) // target_group_size
        group_j = (j - first_candidate).clamp(min=0) // target_group_size
        if peer:
            rule = rule & (~j_cand | ~i_cand | (group_i == group_j))
        else:
            rule = rule & (~j_cand | (i_cand & (group_i == group_j)))
    if num_contextual is not None:
        num_ctx = num_contextual.view(-1, 1, 1)
        if peer:
            history_end = length if num_targets is None else first_candidate
            rule = rule | ((i < num_ctx) & (j < history_end))
        else:
            rule = rule | ((i < num_ctx) & (j < num_ctx))
    return valid & rule


def lengths_from_offsets(offsets: Tensor) -> Tensor:
    """int64 [B+1] offsets -> int64 [B] lengths."""
    return offsets[1:] - offsets[:-1]


def offsets_from_lengths(lengths: Tensor) -> Tensor:
    """int64 [B] lengths -> int64 [B+1] offsets starting at 0."""
    offsets = lengths.new_zeros(lengths.numel() + 1)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    return offsets
