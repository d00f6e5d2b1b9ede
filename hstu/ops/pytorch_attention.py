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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hstu.ops.masks import dense_mask, lengths_from_offsets
from hstu.ops.rab import (
    RelativeAttentionBias,
    bias_from_indices,
    relative_positions,
    time_buckets,
)
from hstu.sync_audit import allowed_sync

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


@dataclass
class _Chunk:
    """What one chunk needs besides q, k, v; depends only on the batch's structure."""

    width: int
    h0: int
    h1: int
    token_index: Tensor  # int64 [b, n] (0 on padding)
    rows: Tensor  # int64 [tokens of the chunk] = token_index[valid]
    flat_index: Tensor  # int64 [b * n] = token_index.reshape(-1)
    valid_index: Tensor  # int64 [tokens of the chunk]: valid slots of the flattened [b * n]
    mask: Tensor  # bool [b, 1, n, n]
    rel: Tensor | None  # int64 [n, n] position-table index (rab)
    buckets: Tensor | None  # int64 [b, n, n] time-bucket index (rab with time)
    # causal chunks: query rows [0, split) only need keys [0, split) (0: no split); per
    # part (rows, keys, mask, rel, buckets), the upper-right quarter is never computed
    split: int = 0
    parts: list | None = None


# a causal chunk this wide or wider is computed as two row blocks (top rows against the
# first half of the keys only): a quarter of its scores skipped
CAUSAL_SPLIT_MIN_WIDTH = 32


# One entry: the plan of the last batch. Every layer of a block calls the attention with the
# same offsets / counts / timestamps tensors, so the masks, gather indices and rab indices
# are built once per batch instead of once per layer. The key holds the tensors themselves
# (their ids cannot be reused while cached) and their versions (an in-place change misses).
_PLAN_CACHE: list = []


def _key_part(t: Tensor | None):
    return None if t is None else (id(t), t._version, t.device, t.dtype, tuple(t.shape))


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A small host-built index on ``device``; from pinned memory, so no sync on CUDA."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _plan(
    offsets: Tensor,
    num_heads: int,
    budget: int,
    causal: bool,
    num_contextual: Tensor | None,
    num_targets: Tensor | None,
    target_group_size: int,
    rab_positions: int | None,
    timestamps: Tensor | None,
    mask_convention: str,
    query_timestamps: Tensor | None = None,
) -> list[_Chunk]:
    key = (
        _key_part(offsets), _key_part(num_contextual), _key_part(num_targets),
        _key_part(timestamps), _key_part(query_timestamps), num_heads, budget, causal,
        target_group_size, rab_positions, mask_convention,
    )
    if _PLAN_CACHE and _PLAN_CACHE[0][0] == key:
        return _PLAN_CACHE[0][2]
    # The reference backend sizes its chunks from the lengths on the host: a host sync on
    # CUDA, once per batch (the plan is shared by the layers). The triton and cutlass
    # kernels take the offsets on the device.
    with allowed_sync("pytorch attention backend: chunk plan from the lengths, once per batch"):
        chunks = _build_plan(
            offsets, num_heads, budget, causal, num_contextual, num_targets, target_group_size,
            rab_positions, timestamps, mask_convention, query_timestamps,
        )
    _PLAN_CACHE[:] = [
        (key, (offsets, num_contextual, num_targets, timestamps, query_timestamps), chunks)
    ]
    return chunks


def _build_plan(
    offsets: Tensor,
    num_heads: int,
    budget: int,
    causal: bool,
    num_contextual: Tensor | None,
    num_targets: Tensor | None,
    target_group_size: int,
    rab_positions: int | None,
    timestamps: Tensor | None,
    mask_convention: str,
    query_timestamps: Tensor | None = None,
) -> list[_Chunk]:
    device = offsets.device
    lengths = lengths_from_offsets(offsets)
    chunks = []
    rel_by_width: dict[int, Tensor] = {}
    # The chunk shapes depend on the lengths, so the plan reads them (and the counts) on the
    # host: free for CPU tensors, one device-to-host sync per batch on CUDA (the plan is
    # cached across the layers). That is why this reference backend is not sync-free on a
    # GPU; the triton and cutlass backends are. Everything below builds its indices on the
    # host and copies them over without another sync.
    host_lengths = lengths.tolist()
    # zero contextual / target counts leave the mask as it is without them: such a chunk's
    # mask skips those terms (retrieval training has neither)
    ctx_counts = None if num_contextual is None else num_contextual.tolist()
    target_counts = None if num_targets is None else num_targets.tolist()
    for samples, width, h0, h1 in plan_chunks(host_lengths, num_heads, budget):
        sample_ids = _to_device(torch.tensor(samples, dtype=torch.int64), device)
        # valid slots of the flattened [b * n] chunk (no nonzero / boolean-mask indexing)
        slots = [torch.arange(r * width, r * width + host_lengths[s])
                 for r, s in enumerate(samples)]
        valid_index = _to_device(torch.cat(slots), device)
        chunk_lengths = lengths[sample_ids]
        slot = torch.arange(width, device=device)
        valid = slot.view(1, -1) < chunk_lengths.view(-1, 1)
        token_index = torch.where(valid, offsets[sample_ids].view(-1, 1) + slot.view(1, -1), 0)
        max_ctx = 0 if ctx_counts is None else max(ctx_counts[s] for s in samples)
        max_targets = 0 if target_counts is None else max(target_counts[s] for s in samples)
        mask = dense_mask(
            chunk_lengths,
            num_contextual[sample_ids] if max_ctx > 0 else None,
            num_targets[sample_ids] if max_targets > 0 else None,
            target_group_size,
            causal,
            width,
            mask_convention,
        ).unsqueeze(1)
        rel = buckets = None
        if rab_positions is not None:
            if width not in rel_by_width:
                rel_by_width[width] = relative_positions(width, rab_positions, device)
            rel = rel_by_width[width]
        split = width // 2
        # rows i < split see keys j <= max(i, C - 1) under the causal mask (contextual tokens
        # see each other both ways), so keys [0, split) suffice while C <= split; under the
        # "peer" mask contextual rows see the whole history, so only without them
        ctx_limit = 0 if mask_convention == "peer" else split
        causal_split = causal and width >= CAUSAL_SPLIT_MIN_WIDTH and max_ctx <= ctx_limit
        blocks = ((slice(0, split), slice(0, split)), (slice(split, width), slice(0, width)))
        part_buckets = [None, None]
        if rel is not None and timestamps is not None:
            chunk_query = None if query_timestamps is None else query_timestamps[sample_ids]
            if causal_split:  # only the blocks the split computes
                part_buckets = [
                    time_buckets(timestamps, token_index, chunk_lengths, rows_, keys_, chunk_query)
                    for rows_, keys_ in blocks
                ]
            else:
                buckets = time_buckets(
                    timestamps, token_index, chunk_lengths, query_timestamps=chunk_query
                )
        flat_index = token_index.reshape(-1)
        chunk = _Chunk(
            width, h0, h1, token_index, flat_index.index_select(0, valid_index), flat_index,
            valid_index, mask, rel, buckets,
        )
        if causal_split:
            chunk.split = split
            chunk.parts = [
                (
                    rows_, keys_, mask[:, :, rows_, keys_],
                    None if rel is None else rel[rows_, keys_].contiguous(),
                    part_buckets[p],
                )
                for p, (rows_, keys_) in enumerate(blocks)
            ]
        chunks.append(chunk)
    return chunks


def _scores_times_v(
    qb: Tensor, kb: Tensor, vb: Tensor, mask: Tensor, rel: Tensor | None, buckets: Tensor | None,
    rab: RelativeAttentionBias | None, alpha: float, b: int, h: int, compute_dtype: torch.dtype,
) -> Tensor:
    """masked SiLU(alpha q k^T + rab) v for one block of rows: qb [b*h, r, d], kb / vb
    [b*h, m, d], mask [b, 1, r, m] -> [b*h, r, d] (not yet divided by N)."""
    r, m = qb.shape[1], kb.shape[1]
    if rab is not None:
        bias = bias_from_indices(rab, rel, buckets).to(compute_dtype)
        bias = bias.unsqueeze(1).expand(b, h, r, m).reshape(b * h, r, m)
        scores = torch.baddbmm(bias, qb, kb.transpose(1, 2), alpha=alpha)
    else:
        scores = torch.bmm(qb, kb.transpose(1, 2))
        if alpha != 1.0:
            scores = scores * alpha
    weights = torch.where(mask, F.silu(scores.view(b, h, r, m)), 0.0).view(b * h, r, m)
    return torch.bmm(weights, vb)


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
    mask_convention: str = "hstu",
    memory_budget_bytes: int | None = None,
) -> Tensor:
    """O = (SiLU(alpha Q K^T + rab) / N masked) V, sample by sample.

    Args:
        q, k, v: [T, H, d] jagged values.
        offsets: int64 [B + 1].
        max_seqlen: unused here beyond validation (lengths come from ``offsets``).
        mask_convention: "hstu" | "peer" (``hstu.ops.masks``).
        memory_budget_bytes: cap on the float32 score tensors of one chunk.

    Returns:
        [T, H, d] in q's dtype.
    """
    del max_seqlen
    budget = memory_budget_bytes or DEFAULT_MEMORY_BUDGET_BYTES
    num_tokens, num_heads, _head_dim = q.shape
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    chunks = _plan(
        offsets, num_heads, budget, causal, num_contextual, num_targets, target_group_size,
        None if rab is None else rab.max_positions,
        None if rab is None or rab.ts_weights is None else rab.timestamps,
        mask_convention,
        None if rab is None or rab.ts_weights is None else rab.query_timestamps,
    )
    out = q.new_zeros(num_tokens, num_heads, v.shape[2], dtype=compute_dtype)
    pieces: list[Tensor] = []
    ids: list[Tensor] = []
    for c in chunks:
        b, n = c.token_index.shape
        h = c.h1 - c.h0

        def padded(x: Tensor, c: _Chunk = c, b: int = b, n: int = n, h: int = h) -> Tensor:
            # [T, H, d] -> [b * h, n, d]; index_select's backward is an index_add
            g = x.index_select(0, c.flat_index)
            if h != num_heads:
                g = g[:, c.h0 : c.h1]
            return g.view(b, n, h, -1).transpose(1, 2).reshape(b * h, n, -1).to(compute_dtype)

        qb, kb, vb = padded(q), padded(k), padded(v)
        if c.parts is None:
            chunk_out = _scores_times_v(qb, kb, vb, c.mask, c.rel, c.buckets, rab, alpha, b, h, compute_dtype)
        else:
            chunk_out = torch.cat(
                [
                    _scores_times_v(qb[:, rows_], kb[:, keys_], vb[:, keys_], mask, rel, buckets,
                                    rab, alpha, b, h, compute_dtype)
                    for rows_, keys_, mask, rel, buckets in c.parts
                ],
                dim=1,
            )
        # 1/N on the [b*h, n, d] output instead of the [b*h, n, n] weights
        chunk_out = chunk_out / scaling_seqlen
        chunk_out = chunk_out.view(b, h, n, -1).transpose(1, 2).reshape(b * n, h, -1)
        chunk_out = chunk_out.index_select(0, c.valid_index)
        if c.h0 == 0 and c.h1 == num_heads:
            pieces.append(chunk_out)
            ids.append(c.rows)
        else:
            # head-split chunk of one long sample: place its heads directly
            out = out.index_put(
                (c.rows.view(-1, 1), torch.arange(c.h0, c.h1, device=q.device).view(1, -1)),
                chunk_out,
            )
    if pieces:
        out = out.index_copy(0, torch.cat(ids), torch.cat(pieces))
    return out.to(q.dtype)
