"""HSTU attention masks.

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

Semi-local attention (``max_attn_len`` W > 0, ``min_full_attn_seq_len`` M >= 0; Meta's names,
W = 0 is full attention) keeps a pair the rule above allows only when it is also near:

    (i < C and j < L - G)                                # contextual rows: the history
    or (convention "hstu" and j < C)                     # "hstu": contextual keys always seen
    or (M > 0 and pos(i) >= L - G - M)                   # the last M history rows and the
                                                         # candidates see the whole history
    or |pos(i) - pos(j)| <= W

    pos(t) = C - 1     for t < C                         # contextual tokens: one position
           = t         for C <= t < L - G
           = L - G     for t >= L - G                    # candidates: the first candidate's

So a history token sees itself and its W predecessors (and, without the causal mask, its W
successors), candidates count their distance from the first candidate (the members of a
group are at distance 0), and under "peer" a contextual key is at distance i - C + 1 from
history row i: exactly Meta's ``_get_valid_attn_mask`` (generative_recommenders,
ops/pytorch/pt_hstu_attention.py), which measures distances in the same collapsed positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hstu.ops.rab import RelativeAttentionBias

MASK_CONVENTIONS = ("hstu", "peer")


def check_mask_convention(mask_convention: str) -> None:
    """Refuse a name that is not in ``MASK_CONVENTIONS`` (one line)."""
    if mask_convention not in MASK_CONVENTIONS:
        raise ValueError(
            f"mask_convention must be one of {list(MASK_CONVENTIONS)}, got {mask_convention!r}"
        )


def check_window(max_attn_len: int, min_full_attn_seq_len: int) -> None:
    """Refuse negative window settings, or M without W (one line)."""
    if max_attn_len < 0 or min_full_attn_seq_len < 0:
        raise ValueError(
            "max_attn_len and min_full_attn_seq_len must be >= 0 (0: off), got "
            f"{max_attn_len} and {min_full_attn_seq_len}"
        )
    if min_full_attn_seq_len > 0 and max_attn_len == 0:
        raise ValueError(
            f"min_full_attn_seq_len={min_full_attn_seq_len} needs max_attn_len > 0 (without a "
            "window every row already sees the whole history)"
        )


@dataclass(frozen=True)
class AttentionOptions:
    """The keyword arguments of one HSTU attention call, written once: those of
    ``hstu.ops.hstu_attention`` besides ``backend`` and ``strict``, which every backend of
    ``hstu.registry.ATTENTION_BACKENDS`` takes as ``**options`` (B samples). Refuses a bad
    value in one line."""

    alpha: float
    """Scale on Q K^T (1/sqrt(d) production, 1.0 research model)."""
    scaling_seqlen: int
    """N: the SiLU output is divided by it (> 0)."""
    causal: bool = True
    """Key j <= query i outside the contextual block."""
    num_contextual: Tensor | None = None
    """int64 [B], leading tokens of each sample that see each other fully."""
    num_targets: Tensor | None = None
    """int64 [B], trailing candidate tokens of each sample."""
    target_group_size: int = 1
    """Candidates per target group (>= 1)."""
    rab: RelativeAttentionBias | None = None
    """Optional relative attention bias inputs (computed inside the kernel)."""
    mask_convention: str = "hstu"
    """"hstu" (ours) or "peer" (Meta's and NVIDIA's: contextual rows see the whole
    non-candidate history; without ``causal`` non-candidates see the candidates); the
    module docstring, docs/model.md "Mask conventions"."""
    max_attn_len: int = 0
    """W, the semi-local window (0: full attention): a pair the mask allows is kept only
    within W positions (the module docstring)."""
    min_full_attn_seq_len: int = 0
    """M (needs W > 0): the last M history rows and the candidates keep the whole history."""

    def __post_init__(self) -> None:
        if self.target_group_size < 1:
            raise ValueError(f"target_group_size must be >= 1, got {self.target_group_size}")
        if self.scaling_seqlen <= 0:
            raise ValueError(f"scaling_seqlen must be > 0, got {self.scaling_seqlen}")
        check_mask_convention(self.mask_convention)
        check_window(self.max_attn_len, self.min_full_attn_seq_len)


def dense_mask(
    lengths: Tensor,
    num_contextual: Tensor | None,
    num_targets: Tensor | None,
    target_group_size: int,
    causal: bool,
    width: int,
    mask_convention: str = "hstu",
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    rows: Tensor | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Vectorised mask for a padded group of samples, or a block of it.

    Args:
        lengths: int64 [b] tokens per sample (each <= width).
        num_contextual: int64 [b] or None (no contextual tokens).
        num_targets: int64 [b] or None (no candidates).
        target_group_size: candidates per target group (>= 1).
        causal: keep j <= i outside the contextual block.
        width: n, the padded width.
        mask_convention: "hstu" | "peer" (the module docstring).
        max_attn_len, min_full_attn_seq_len: the semi-local window (0: full attention).
        rows, keys: int64 positions of the block's queries and keys, [R] (or [b, R] per
            sample) and [K] (or [b, K]); default: all ``width``.

    Returns:
        bool [b, rows, keys] (default [b, n, n]): ``mask[s, r, c]`` says whether query
        ``rows[r]`` of sample s sees key ``keys[c]``. Positions at or beyond ``lengths[s]``
        are all False.
    """
    check_mask_convention(mask_convention)
    check_window(max_attn_len, min_full_attn_seq_len)
    peer = mask_convention == "peer"
    device = lengths.device
    pos = torch.arange(width, device=device)
    row_pos = pos if rows is None else rows.to(device)
    key_pos = pos if keys is None else keys.to(device)
    # [R] or [b, R] -> [1 or b, R, 1]; [K] or [b, K] -> [1 or b, 1, K]
    i = row_pos.reshape(-1, row_pos.shape[-1], 1)
    j = key_pos.reshape(-1, 1, key_pos.shape[-1])
    length = lengths.view(-1, 1, 1)
    valid = (i < length) & (j < length)
    if causal:
        rule = j <= i
    else:
        rule = torch.ones((), dtype=torch.bool, device=device)  # broadcasts
    first_candidate = length if num_targets is None else length - num_targets.view(-1, 1, 1)
    if num_targets is not None:
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
            rule = rule | ((i < num_ctx) & (j < first_candidate))
        else:
            rule = rule | ((i < num_ctx) & (j < num_ctx))
    if max_attn_len > 0:
        num_ctx = (torch.zeros_like(length) if num_contextual is None
                   else num_contextual.view(-1, 1, 1))
        pos_i = torch.minimum(torch.maximum(i, num_ctx - 1), first_candidate)
        pos_j = torch.minimum(torch.maximum(j, num_ctx - 1), first_candidate)
        near = (pos_i - pos_j).abs() <= max_attn_len
        near = near | ((i < num_ctx) & (j < first_candidate))
        if not peer:
            near = near | (j < num_ctx)
        if min_full_attn_seq_len > 0:
            near = near | (pos_i >= first_candidate - min_full_attn_seq_len)
        rule = rule & near
    return valid & rule

