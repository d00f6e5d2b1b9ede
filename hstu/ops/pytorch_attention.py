"""Reference HSTU attention in plain torch ops: jagged in, jagged out, memory-aware.

Legend: T total tokens, B samples, H heads, d head dim, b samples of one chunk, h heads of
one chunk, n the padded width of a chunk (its longest sample), N ``scaling_seqlen``.

Samples are sorted by length and cut into chunks of similar lengths (the shortest longer
than half the longest) whose score tensors fit a memory budget, so a batch never
materialises a dense [B, H, max_seqlen, max_seqlen]; a single sample too long for the budget
is further split over heads. Scores are computed in at least float32 whatever the input
dtype (float64 stays float64); autograd runs through the plain ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hstu.ops.masks import dense_mask, lengths_from_offsets
from hstu.ops.rab import RelativeAttentionBias, padded_bias

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 2**20
# float32 [b, h, n, n] tensors alive at once per chunk, autograd's saved ones included
_SCORE_TENSORS_ALIVE = 4
_SCORE_BYTES = 4
# a chunk of width n only takes samples longer than this fraction of n
MIN_CHUNK_FILL = 0.5


def plan_chunks(
    lengths: list[int],
    num_heads: int,
    memory_budget_bytes: int,
    min_fill: float = MIN_CHUNK_FILL,
) -> list[tuple[list[int], int, int, int]]:
    """Group samples (longest first) into chunks that fit the budget and waste little padding.

    A chunk of width n takes samples longer than ``min_fill * n`` only, so padding at most
    multiplies the score work by 1 / min_fill**2; a sample alone over budget is split by heads.

    Returns:
        (sample ids, padded width n, first head, end head) per chunk; empty samples dropped.
    """
    order = sorted((s for s in range(len(lengths)) if lengths[s] > 0), key=lambda s: -lengths[s])
    chunks: list[tuple[list[int], int, int, int]] = []
    pos = 0
    while pos < len(order):
        width = lengths[order[pos]]
        per_head = _SCORE_TENSORS_ALIVE * _SCORE_BYTES * width * width
        per_sample = per_head * num_heads
        if per_sample > memory_budget_bytes:
            heads_per_chunk = max(1, memory_budget_bytes // per_head)
            for h0 in range(0, num_heads, heads_per_chunk):
                chunks.append(([order[pos]], width, h0, min(num_heads, h0 + heads_per_chunk)))
            pos += 1
            continue
        end = pos + 1
        limit = pos + max(1, memory_budget_bytes // per_sample)
        while end < min(limit, len(order)) and lengths[order[end]] > min_fill * width:
            end += 1
        chunks.append((order[pos:end], width, 0, num_heads))
        pos = end
    return chunks


def pytorch_hstu_attention(
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
    memory_budget_bytes: int | None = None,
) -> Tensor:
    """O = (SiLU(alpha Q K^T + rab) / N masked) V, sample by sample.

    Args:
        q, k, v: [T, H, d] jagged values.
        offsets: int64 [B + 1].
        max_seqlen: unused here beyond validation (lengths come from ``offsets``).
        memory_budget_bytes: cap on the float32 score tensors of one chunk.

    Returns:
        [T, H, d] in q's dtype.
    """
    del max_seqlen
    budget = memory_budget_bytes or DEFAULT_MEMORY_BUDGET_BYTES
    num_tokens, num_heads, _head_dim = q.shape
    lengths = lengths_from_offsets(offsets)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    out = q.new_zeros(num_tokens, num_heads, v.shape[2], dtype=compute_dtype)
    pieces: list[Tensor] = []
    ids: list[Tensor] = []
    for samples, width, h0, h1 in plan_chunks(lengths.tolist(), num_heads, budget):
        sample_ids = torch.tensor(samples, dtype=torch.int64, device=q.device)
        chunk_lengths = lengths[sample_ids]
        slot = torch.arange(width, device=q.device)
        valid = slot.view(1, -1) < chunk_lengths.view(-1, 1)
        token_index = torch.where(valid, offsets[sample_ids].view(-1, 1) + slot.view(1, -1), 0)
        qc = q[token_index][:, :, h0:h1].to(compute_dtype)
        kc = k[token_index][:, :, h0:h1].to(compute_dtype)
        vc = v[token_index][:, :, h0:h1].to(compute_dtype)
        scores = alpha * torch.einsum("bihd,bjhd->bhij", qc, kc)
        if rab is not None:
            scores = scores + padded_bias(rab, token_index, chunk_lengths).to(
                compute_dtype
            ).unsqueeze(1)
        mask = dense_mask(
            chunk_lengths,
            None if num_contextual is None else num_contextual[sample_ids],
            None if num_targets is None else num_targets[sample_ids],
            target_group_size,
            causal,
            width,
        ).unsqueeze(1)
        weights = torch.where(mask, F.silu(scores), 0.0) / scaling_seqlen
        chunk_out = torch.einsum("bhij,bjhd->bihd", weights, vc)[valid]
        if h0 == 0 and h1 == num_heads:
            pieces.append(chunk_out)
            ids.append(token_index[valid])
        else:
            # head-split chunk of one long sample: place its heads directly
            rows = token_index[valid]
            out = out.index_put(
                (rows.view(-1, 1), torch.arange(h0, h1, device=q.device).view(1, -1)), chunk_out
            )
    if pieces:
        out = out.index_copy(0, torch.cat(ids), torch.cat(pieces))
    return out.to(q.dtype)
