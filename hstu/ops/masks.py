"""HSTU attention masks and small jagged helpers.

Legend: B samples, T total tokens (jagged), L[b] tokens of sample b, n the padded width of a
group of samples, C[b] contextual tokens (``num_contextual``), G[b] candidates
(``num_targets``), g ``target_group_size``.

Token i of a sample may attend token j (both in [0, L)) iff

    (i < C and j < C)                                    # contextual block, both directions
    or (causal_ok(i, j) and candidate_rule(i, j))

    causal_ok(i, j)      = j <= i            (causal=True)  | True (causal=False)
    candidate_rule(i, j) = j < L - G                              (j is not a candidate)
                           or (i >= L - G and group(i) == group(j))
    group(t)             = (t - (L - G)) // g                     (for candidates only)

So a non-candidate never sees a candidate, a candidate sees every (earlier, when causal)
non-candidate and the (earlier, when causal) members of its own group, and contextual tokens
are visible to every later token. We assume C + G <= L (a token is never both).
"""

from __future__ import annotations

import torch
from torch import Tensor


def allowed(
    i: int,
    j: int,
    length: int,
    num_contextual: int,
    num_targets: int,
    target_group_size: int,
    causal: bool,
) -> bool:
    """The mask rule for one (query i, key j) pair of one sample, in plain Python.

    Deliberately written as the docstring above states it, for tests and documentation.
    """
    if i >= length or j >= length:
        return False
    if i < num_contextual and j < num_contextual:
        return True
    if causal and j > i:
        return False
    first_candidate = length - num_targets
    if j < first_candidate:
        return True
    if i < first_candidate:
        return False
    return (i - first_candidate) // target_group_size == (j - first_candidate) // target_group_size


def dense_mask(
    lengths: Tensor,
    num_contextual: Tensor | None,
    num_targets: Tensor | None,
    target_group_size: int,
    causal: bool,
    width: int,
) -> Tensor:
    """Vectorised mask for a padded group of samples.

    Args:
        lengths: int64 [b] tokens per sample (each <= width).
        num_contextual: int64 [b] or None (no contextual tokens).
        num_targets: int64 [b] or None (no candidates).
        target_group_size: candidates per target group (>= 1).
        causal: keep j <= i outside the contextual block.
        width: n, the padded width.

    Returns:
        bool [b, n, n]: ``mask[s, i, j]`` says whether query i of sample s sees key j.
        Rows and columns at or beyond ``lengths[s]`` are all False.
    """
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
        rule = rule & (~j_cand | (i_cand & (group_i == group_j)))
    if num_contextual is not None:
        num_ctx = num_contextual.view(-1, 1, 1)
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
