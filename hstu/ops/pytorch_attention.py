"""Reference HSTU attention in plain torch ops: jagged in, jagged out, memory-aware.

Legend: T total tokens, B samples, H heads, d head dim, b samples of one chunk, h heads of
one chunk, n the padded width of a chunk (its longest sample), N ``scaling_seqlen``.

Samples are sorted by length and cut into chunks of similar lengths (the shortest longer
than half the longest) whose score tensors fit a memory budget, so a batch never
materialises a dense [B, H, max_seqlen, max_seqlen]. A single sample too long for the
budget, or long against the semi-local window (``max_attn_len``), is computed alone in row
blocks, each against the keys its rows can see, by a custom autograd function that keeps no
scores: backward recomputes each block's (memory O(n x block), not O(n^2), and time linear in
the number of blocks). Shorter windowed samples stay batched in chunks, computed in row
blocks against the band of keys any sample of the chunk can see (``_band_blocks``).
Scores are computed in at least float32 whatever the input
dtype (float64 stays float64). A batch of dense chunks runs in one autograd function that
does the padded layout and the gradients by hand (``_DenseChunksAttention``); a batch with
row blocks, or whose chunks' scores would together exceed the budget, runs the chunks
through autograd as before (recomputed in backward where the budget asks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from hstu.ops.masks import AttentionOptions, dense_mask
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
    max_attn_len: int = 0,
) -> list[tuple[list[int], int, bool]]:
    """Group samples (longest first) into chunks that fit the budget and waste little padding.

    A chunk of width n takes samples longer than ``MIN_CHUNK_FILL * n`` only, so padding at
    most multiplies the score work by 1 / MIN_CHUNK_FILL**2. A sample is computed alone in
    row blocks (``blocked``) when its dense scores reach the budget, or when a window
    ``max_attn_len`` W > 0 leaves it most keys unseen (longer than ``WINDOW_BLOCKED_MIN * W``
    and than ``WINDOW_BLOCKED_MIN_LENGTH``; shorter windowed samples stay in chunks, which
    ``_band_blocks`` computes against the band).

    Returns:
        (sample ids, padded width n, blocked) per chunk; empty samples dropped.
    """
    order = sorted((s for s in range(len(lengths)) if lengths[s] > 0), key=lambda s: -lengths[s])
    chunks: list[tuple[list[int], int, bool]] = []
    pos = 0
    while pos < len(order):
        width = lengths[order[pos]]
        per_sample = _SCORE_TENSORS_ALIVE * _SCORE_BYTES * width * width * num_heads
        windowed = (max_attn_len > 0 and width > WINDOW_BLOCKED_MIN * max_attn_len
                    and width >= WINDOW_BLOCKED_MIN_LENGTH)
        if per_sample >= memory_budget_bytes or windowed:
            chunks.append(([order[pos]], width, True))
            pos += 1
            continue
        end = pos + 1
        limit = pos + max(1, memory_budget_bytes // per_sample)
        while end < min(limit, len(order)) and lengths[order[end]] > MIN_CHUNK_FILL * width:
            end += 1
        chunks.append((order[pos:end], width, False))
        pos = end
    return chunks


# a sample longer than this many windows (``max_attn_len``), and than
# WINDOW_BLOCKED_MIN_LENGTH tokens, is computed alone in row blocks against the band of keys
# its rows can see (shorter ones in chunks, in band blocks shared by the chunk's samples)
WINDOW_BLOCKED_MIN = 3
WINDOW_BLOCKED_MIN_LENGTH = 1024
# windowed row blocks take W / this many rows: against about (1 + 1 / this) W keys each
WINDOW_BLOCK_DIVISOR = 4
# the most query rows of a row block against the whole history: smaller blocks skip more
# of the causal future, and keep memory well under the budget
MAX_BLOCK_ROWS = 512
# float32 [h, R, K] tensors alive at once in the backward of a row block
_BLOCK_TENSORS_ALIVE = 5
# the fewest query rows of a row block (a budget too small for them is exceeded instead)
MIN_BLOCK_ROWS = 64
# the block masks and rab indices of a blocked sample are kept for the batch's other layers
# while they take at most this fraction of the budget, else rebuilt at each use
_BLOCK_INDEX_CACHE_FRACTION = 2


@dataclass
class _Block:
    """One row block of a blocked chunk: query rows [r0, r1) against the keys they can see."""

    r0: int
    r1: int
    keys: slice | Tensor  # the key slots: one range, or int64 [K] (a union of ranges)
    key_pos: Tensor  # int64 [K] the same slots as an index
    mask: Tensor | None = None  # bool [b, 1, R, K], cached (None: built at each use)
    rel: Tensor | None = None  # int32 [R, K] position-table index, cached
    buckets: Tensor | None = None  # int32 [b, R, K] time-bucket index, cached


@dataclass
class _Blocked:
    """A sample computed alone in row blocks (long, or windowed), or a windowed chunk of
    samples computed in the same row blocks for all of them (``_band_blocks``), and what the
    blocks' masks and rab indices are built from."""

    blocks: list[_Block]
    cached: bool  # block masks / indices kept in the plan
    lengths: Tensor  # int64 [b]
    # the mask's options, with the chunk's own counts (int64 [b], None where all zero), no rab
    rule: AttentionOptions
    rab_positions: int | None
    timestamps: Tensor | None
    token_index: Tensor  # int64 [b, n]
    query_timestamps: Tensor | None  # int64 [b]
    # b: one long sample (1), or a windowed chunk of b samples computed in band blocks
    samples: int


def _chunk_mask(spec: _Blocked, rows: Tensor | None = None, keys: Tensor | None = None) -> Tensor:
    """bool [b, 1, R, K]: ``dense_mask`` of the chunk's samples, at ``rows`` x ``keys``
    (None: all n)."""
    o = spec.rule
    return dense_mask(
        spec.lengths, o.num_contextual, o.num_targets, o.target_group_size, o.causal,
        spec.token_index.shape[1], o.mask_convention, o.max_attn_len, o.min_full_attn_seq_len,
        rows=rows, keys=keys,
    ).unsqueeze(1)


@dataclass
class _Chunk:
    """What one chunk needs besides q, k, v; depends only on the batch's structure."""

    width: int
    token_index: Tensor  # int64 [b, n] (0 on padding)
    rows: Tensor  # int64 [tokens of the chunk] = token_index[valid]
    flat_index: Tensor  # int64 [b * n] = token_index.reshape(-1)
    valid_index: Tensor  # int64 [tokens of the chunk]: valid slots of the flattened [b * n]
    mask: Tensor | None = None  # bool [b, 1, n, n] (None: blocked)
    rel: Tensor | None = None  # int64 [n, n] position-table index (rab)
    buckets: Tensor | None = None  # int64 [b, n, n] time-bucket index (rab with time)
    # causal chunks: query rows [0, split) only need keys [0, split) (0: no split); per
    # part (rows, keys, mask, rel, buckets), the upper-right quarter is never computed
    split: int = 0
    parts: list | None = None
    # one long sample, or a windowed chunk, in row blocks; mask / rel / buckets are then None
    blocked: _Blocked | None = None
    # per part and dtype: the mask as scores to add, 0 where seen and _HIDDEN_SCORE where not
    # (_DenseChunksAttention; built at first use, kept with the plan for the batch's layers)
    additive: dict = field(default_factory=dict)

    def added_mask(self, part: int, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """[b, R, K] in ``dtype``: part ``part``'s ``mask`` [b, 1, R, K] as added scores."""
        key = (part, dtype)
        if key not in self.additive:
            hidden = torch.zeros(mask.shape[0], mask.shape[2], mask.shape[3], dtype=dtype,
                                 device=mask.device)
            self.additive[key] = hidden.masked_fill_(~mask[:, 0], _HIDDEN_SCORE)
        return self.additive[key]


# the score a hidden (query, key) pair gets in _DenseChunksAttention: SiLU of it is -0.0 and so
# is its derivative (its sigmoid underflows to exactly 0), whatever finite score and bias it
# is added to: the mask costs one add, in forward only (a masked_fill of the [h, b, R, K]
# weights with a broadcast mask took 10x as long, in forward and again in backward)
_HIDDEN_SCORE = -1e30


# a causal chunk this wide or wider is computed as two row blocks (top rows against the
# first half of the keys only): a quarter of its scores skipped
CAUSAL_SPLIT_MIN_WIDTH = 32
# a windowed chunk (max_attn_len W > 0) is computed in row blocks of W / this many rows, each
# against the keys some sample's rows can see (the band, the contextual tokens, the rows that
# see the whole history), recomputed in backward, when that computes at most
# BAND_MAX_WORK of the scores the dense path does
BAND_ROWS_DIVISOR = 2
BAND_MIN_ROWS = 16
BAND_MAX_WORK = 0.85
# key runs of a row block closer than this many slots are computed as one range
BAND_MERGE_GAP = 16


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


def _plan(offsets: Tensor, num_heads: int, budget: int, o: AttentionOptions) -> list[_Chunk]:
    """The chunks of a batch, built once for the layers that share its tensors."""
    rab = o.rab
    timed = rab is not None and rab.ts_weights is not None
    rab_positions = None if rab is None else rab.max_positions
    timestamps = rab.timestamps if timed else None
    query_timestamps = rab.query_timestamps if timed else None
    key = (
        _key_part(offsets), _key_part(o.num_contextual), _key_part(o.num_targets),
        _key_part(timestamps), _key_part(query_timestamps), num_heads, budget, o.causal,
        o.target_group_size, rab_positions, o.mask_convention, o.max_attn_len,
        o.min_full_attn_seq_len,
    )
    if _PLAN_CACHE and _PLAN_CACHE[0][0] == key:
        return _PLAN_CACHE[0][2]
    # The reference backend sizes its chunks from the lengths on the host: a host sync on
    # CUDA, once per batch (the plan is shared by the layers). The triton and cutlass
    # kernels take the offsets on the device.
    with allowed_sync("pytorch attention backend: chunk plan from the lengths, once per batch"):
        chunks = _build_plan(
            offsets, num_heads, budget, o, rab_positions, timestamps, query_timestamps
        )
    _PLAN_CACHE[:] = [
        (key, (offsets, o.num_contextual, o.num_targets, timestamps, query_timestamps), chunks)
    ]
    return chunks


def _build_plan(
    offsets: Tensor, num_heads: int, budget: int, o: AttentionOptions,
    rab_positions: int | None, timestamps: Tensor | None, query_timestamps: Tensor | None,
) -> list[_Chunk]:
    num_contextual, num_targets = o.num_contextual, o.num_targets
    device = offsets.device
    lengths = offsets[1:] - offsets[:-1]
    chunks = []
    rel_by_width: dict[int, Tensor] = {}
    # the lengths and counts read on the host (the sync ``_plan`` names); the indices below
    # are built on the host and copied over without another sync
    host_lengths = lengths.tolist()
    # zero contextual / target counts leave the mask as it is without them: such a chunk's
    # mask skips those terms (retrieval training has neither)
    ctx_counts = None if num_contextual is None else num_contextual.tolist()
    target_counts = None if num_targets is None else num_targets.tolist()
    for samples, width, blocked in plan_chunks(
        host_lengths, num_heads, budget, max_attn_len=o.max_attn_len
    ):
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
        rule = replace(
            o, rab=None, num_contextual=num_contextual[sample_ids] if max_ctx > 0 else None,
            num_targets=num_targets[sample_ids] if max_targets > 0 else None,
        )
        chunk_query = None if query_timestamps is None else query_timestamps[sample_ids]
        spec = _Blocked([], False, chunk_lengths, rule, rab_positions, timestamps, token_index,
                        chunk_query, len(samples))
        flat_index = token_index.reshape(-1)
        rows = flat_index.index_select(0, valid_index)
        if blocked:
            _plan_blocks(spec, width, max_ctx, max_targets, num_heads, budget, device)
            chunks.append(_Chunk(width, token_index, rows, flat_index, valid_index, blocked=spec))
            continue
        mask = _chunk_mask(spec)
        rel = buckets = None
        if rab_positions is not None:
            if width not in rel_by_width:
                slots = torch.arange(width, device=device)
                rel_by_width[width] = relative_positions(slots, slots, rab_positions)
            rel = rel_by_width[width]
        if o.max_attn_len > 0 and _band_blocks(spec, mask, budget):
            chunks.append(_Chunk(width, token_index, rows, flat_index, valid_index, blocked=spec))
            continue
        split = width // 2
        # rows i < split see keys j <= max(i, C - 1) under the causal mask (contextual tokens
        # see each other both ways), so keys [0, split) suffice while C <= split; under the
        # "peer" mask contextual rows see the whole history, so only without them
        ctx_limit = 0 if o.mask_convention == "peer" else split
        causal_split = o.causal and width >= CAUSAL_SPLIT_MIN_WIDTH and max_ctx <= ctx_limit
        blocks = ((slice(0, split), slice(0, split)), (slice(split, width), slice(0, width)))
        part_buckets = [None, None]
        if rel is not None and timestamps is not None:
            if causal_split:  # only the blocks the split computes
                part_buckets = [
                    time_buckets(timestamps, token_index, chunk_lengths, rows_, keys_, chunk_query)
                    for rows_, keys_ in blocks
                ]
            else:
                buckets = time_buckets(
                    timestamps, token_index, chunk_lengths, query_timestamps=chunk_query
                )
        chunk = _Chunk(width, token_index, rows, flat_index, valid_index, mask, rel, buckets)
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


def _band_blocks(spec: _Blocked, mask: Tensor, budget: int) -> bool:
    """A windowed chunk of b samples in row blocks of W / ``BAND_ROWS_DIVISOR`` rows, each
    against the keys that any of its rows may see in any sample of the chunk, added to
    ``spec``; False (nothing added) when that would compute more than ``BAND_MAX_WORK`` of
    the dense path's scores.

    The keys of a block are read off the chunk's mask [b, 1, n, n] (which each block then
    applies exactly), as runs of slots; runs closer than ``BAND_MERGE_GAP`` are merged. So
    contextual tokens, candidates and the rows that see the whole history
    (``min_full_attn_seq_len``) need no rule of their own here. Like a long sample's blocks,
    the chunk's are recomputed in backward (``_BlockedAttention``): no score is kept."""
    width = mask.shape[-1]
    rows = max(BAND_MIN_ROWS, spec.rule.max_attn_len // BAND_ROWS_DIVISOR)
    if rows >= width:
        return False
    seen = mask[:, 0].any(dim=0)  # [n, n]: may row i see key j in some sample
    spans: list[tuple[int, int, list[tuple[int, int]]]] = []
    for r0 in range(0, width, rows):
        r1 = min(width, r0 + rows)
        runs: list[tuple[int, int]] = []
        for c in seen[r0:r1].any(dim=0).nonzero().view(-1).tolist():
            if runs and c - runs[-1][1] < BAND_MERGE_GAP:
                runs[-1] = (runs[-1][0], c + 1)
            else:
                runs.append((c, c + 1))
        spans.append((r0, r1, runs or [(0, 1)]))  # padding rows only: one key, masked
    elements = sum((r1 - r0) * sum(b - a for a, b in keys) for r0, r1, keys in spans)
    split = spec.rule.causal and width >= CAUSAL_SPLIT_MIN_WIDTH
    dense = width * width - (width // 2) ** 2 if split else width * width
    if elements > BAND_MAX_WORK * dense:
        return False
    _add_blocks(spec, spans, elements * spec.samples, budget, mask.device, mask)
    return True


def _add_blocks(
    spec: _Blocked, spans: list[tuple[int, int, list[tuple[int, int]]]], elements: int,
    budget: int, device: torch.device, mask: Tensor | None = None,
) -> None:
    """The blocks of ``spec`` from (r0, r1, key ranges) spans; their masks and rab indices
    kept while they take at most 1 / ``_BLOCK_INDEX_CACHE_FRACTION`` of the budget
    (``elements``: the mask entries of all blocks); ``mask``: the whole [b, 1, n, n] mask,
    when the caller has it."""
    index_bytes = 1 + (4 if spec.rab_positions is not None else 0) + (
        4 if spec.timestamps is not None else 0)
    spec.cached = elements * index_bytes <= budget // _BLOCK_INDEX_CACHE_FRACTION
    for r0, r1, keys in spans:
        key_pos = _to_device(torch.cat([torch.arange(a, b) for a, b in keys]), device)
        block = _Block(
            r0, r1, slice(keys[0][0], keys[0][1]) if len(keys) == 1 else key_pos, key_pos
        )
        if spec.cached:
            block.mask, block.rel, block.buckets = _block_indices(spec, block, mask)
        spec.blocks.append(block)


def _key_ranges(
    r0: int, r1: int, window: int, length: int, num_ctx: int, first_candidate: int,
    causal: bool, peer: bool,
) -> list[tuple[int, int]]:
    """Sorted disjoint key ranges that hold every key that history or candidate rows
    [r0, r1) of one sample may see with a window of ``window`` (``length``: no window).

    The rule is ``hstu.ops.masks``; this is only a superset of it (the block's mask then
    applies it exactly): the contextual keys, the band of raw slots within the window (a
    history row's position is its slot), and for candidate rows (position: the first
    candidate) the history within the window of the first candidate plus the candidates.
    """
    ranges = [(0, num_ctx)] if num_ctx > 0 else []
    ranges.append((max(0, r0 - window), r1 if causal else min(length, r1 + window)))
    if r1 > first_candidate:  # candidate rows
        ranges.append((max(0, first_candidate - window), r1 if causal else length))
    if peer and not causal and r1 - 1 >= first_candidate - window:
        ranges.append((first_candidate, length))  # "peer": history rows see candidates
    merged: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _plan_blocks(
    spec: _Blocked, length: int, num_ctx: int, num_targets: int, num_heads: int, budget: int,
    device: torch.device,
) -> None:
    """Cut one sample into row blocks, each against the key ranges its rows can see.

    Rows: the contextual rows (they see the contextual block, or the history), then the
    windowed rows (max_attn_len W > 0) in blocks of W / ``WINDOW_BLOCK_DIVISOR`` rows, then
    the rows that see the whole history (every row without a window; the last M history rows
    and the candidates with min_full_attn_seq_len M) in blocks of at most ``MAX_BLOCK_ROWS``
    whose backward tensors fit the budget. The blocks' scores are never kept: backward
    recomputes them (``_BlockedAttention``).
    """
    o = spec.rule
    window, full_from = o.max_attn_len, length
    first = length - num_targets
    if window > 0:
        full_from = max(num_ctx, first - o.min_full_attn_seq_len) if (
            o.min_full_attn_seq_len > 0) else length
    per_row = _BLOCK_TENSORS_ALIVE * _SCORE_BYTES * num_heads
    full_rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, budget // (per_row * length)))
    peer = o.mask_convention == "peer"
    spans: list[tuple[int, int, list[tuple[int, int]]]] = []
    ctx_keys = num_ctx if (o.causal and not peer) else length
    for r0 in range(0, num_ctx, full_rows):
        spans.append((r0, min(num_ctx, r0 + full_rows), [(0, ctx_keys)]))
    if window > 0:
        rows = max(MIN_BLOCK_ROWS, min(-(-window // WINDOW_BLOCK_DIVISOR),
                                       budget // (per_row * (num_ctx + 3 * window))))
        for r0 in range(num_ctx, full_from, rows):
            r1 = min(full_from, r0 + rows)
            spans.append((r0, r1, _key_ranges(r0, r1, window, length, num_ctx, first,
                                              o.causal, peer)))
    for r0 in range(full_from if window > 0 else num_ctx, length, full_rows):
        r1 = min(length, r0 + full_rows)
        spans.append((r0, r1, _key_ranges(r0, r1, length, length, num_ctx, first,
                                          o.causal, peer)))
    elements = sum((r1 - r0) * sum(b - a for a, b in keys) for r0, r1, keys in spans)
    _add_blocks(spec, spans, elements, budget, device)


def _block_indices(
    spec: _Blocked, block: _Block, whole_mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mask [b, 1, R, K], position index [R, K] and time-bucket index [b, R, K] of one
    row block (the same values as the whole sample's, at the block's rows and keys); the
    indices in int32 (half the cache; index_select and index_add_ take them).
    ``whole_mask``: the [b, 1, n, n] mask, to slice instead of building the block's."""
    if spec.cached and block.mask is not None:
        return block.mask, block.rel, block.buckets
    device = block.key_pos.device
    rows = torch.arange(block.r0, block.r1, device=device)
    if whole_mask is not None:
        mask = whole_mask[:, :, block.r0 : block.r1].index_select(3, block.key_pos)
    else:
        mask = _chunk_mask(spec, rows, block.key_pos)
    rel = buckets = None
    if spec.rab_positions is not None:
        rel = relative_positions(rows, block.key_pos, spec.rab_positions).to(torch.int32)
        if spec.timestamps is not None:
            buckets = time_buckets(
                spec.timestamps, spec.token_index, spec.lengths, slice(block.r0, block.r1),
                block.key_pos, spec.query_timestamps,
            ).to(torch.int32)
    return mask, rel, buckets


def _block_keys(x: Tensor, block: _Block) -> Tensor:
    """[h, n, d] -> the block's keys [h, K, d]."""
    if isinstance(block.keys, slice):
        return x[:, block.keys]
    return x.index_select(1, block.keys)


def _block_scores(
    qb: Tensor, kb: Tensor, block: _Block, spec: _Blocked, pos_weights: Tensor | None,
    ts_weights: Tensor | None, alpha: float,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """alpha q k^T + rab of one row block (qb, kb [b*h, n, d]): scores [b*h, R, K], its mask
    (broadcast to the scores) and rab indices."""
    mask, rel, buckets = _block_indices(spec, block)
    keys = _block_keys(kb, block)
    rows = qb[:, block.r0 : block.r1]
    b = spec.samples
    h = qb.shape[0] // b
    r, k = rows.shape[1], keys.shape[1]
    # [b, 1, R, K] -> [1, R, K] (one sample: broadcast over the heads) or [b*h, R, K]
    mask = mask[0] if b == 1 else mask.expand(b, h, r, k).reshape(b * h, r, k)
    if pos_weights is None:
        return torch.bmm(rows, keys.transpose(1, 2)).mul_(alpha), mask, rel, buckets
    assert rel is not None
    bias = pos_weights.to(qb.dtype).index_select(0, rel.reshape(-1)).view(rel.shape)
    if ts_weights is not None:
        assert buckets is not None
        bias = bias + ts_weights.to(qb.dtype).index_select(0, buckets.reshape(-1)).view(
            buckets.shape)  # [b, R, K]
    bias = bias.view(-1, 1, r, k).expand(b, h, r, k).reshape(b * h, r, k)
    scores = torch.baddbmm(bias, rows, keys.transpose(1, 2), alpha=alpha)
    return scores, mask, rel, buckets


class _BlockedAttention(torch.autograd.Function):
    """sum over row blocks of masked SiLU(alpha q k^T + rab) v for one sample or a windowed
    chunk of b samples, [b*h, n, d_v]
    (not yet divided by N), keeping no scores: backward recomputes each block's and adds its
    gradients into q, k, v and the bias tables. HSTU has no softmax, so a block needs nothing
    from the others."""

    @staticmethod
    def forward(ctx, qb, kb, vb, pos_weights, ts_weights, spec, alpha):
        ctx.save_for_backward(qb, kb, vb, pos_weights, ts_weights)
        ctx.spec, ctx.alpha = spec, alpha
        out = qb.new_empty(qb.shape[0], qb.shape[1], vb.shape[2])
        for block in spec.blocks:
            scores, mask, _, _ = _block_scores(qb, kb, block, spec, pos_weights, ts_weights, alpha)
            weights = torch.where(mask, F.silu(scores), 0.0)
            out[:, block.r0 : block.r1] = torch.bmm(weights, _block_keys(vb, block))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qb, kb, vb, pos_weights, ts_weights = ctx.saved_tensors
        spec, alpha = ctx.spec, ctx.alpha
        dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
        need_pos = pos_weights is not None and ctx.needs_input_grad[3]
        need_ts = ts_weights is not None and ctx.needs_input_grad[4]
        dpos = qb.new_zeros(pos_weights.shape) if need_pos else None
        dts = qb.new_zeros(ts_weights.shape) if need_ts else None
        for block in spec.blocks:
            scores, mask, rel, buckets = _block_scores(
                qb, kb, block, spec, pos_weights, ts_weights, alpha)
            rows = slice(block.r0, block.r1)
            go = grad_out[:, rows]
            keys, values = _block_keys(kb, block), _block_keys(vb, block)
            sig = torch.sigmoid(scores)
            weights = torch.where(mask, scores * sig, 0.0)
            # d SiLU(s) / ds = sig (1 + s (1 - sig))
            dscores = torch.bmm(go, values.transpose(1, 2))
            dscores = torch.where(mask, dscores.mul_(sig).mul_(scores.mul_(1 - sig).add_(1)), 0.0)
            dq[:, rows] += torch.bmm(dscores, keys).mul_(alpha)
            dk_block = torch.bmm(dscores.transpose(1, 2), qb[:, rows]).mul_(alpha)
            dv_block = torch.bmm(weights.transpose(1, 2), go)
            if isinstance(block.keys, slice):
                dk[:, block.keys] += dk_block
                dv[:, block.keys] += dv_block
            else:
                dk.index_add_(1, block.keys, dk_block)
                dv.index_add_(1, block.keys, dv_block)
            if dpos is not None or dts is not None:
                # the tables are shared by the heads (and positions by the samples)
                r, k = dscores.shape[1], dscores.shape[2]
                dbias = dscores.view(spec.samples, -1, r, k).sum(1)  # [b, R, K]
                if dpos is not None:
                    dpos.index_add_(0, rel.reshape(-1), dbias.sum(0).reshape(-1))
                if dts is not None:
                    dts.index_add_(0, buckets.reshape(-1), dbias.reshape(-1))
        return (
            dq, dk, dv,
            None if dpos is None else dpos.to(pos_weights.dtype),
            None if dts is None else dts.to(ts_weights.dtype),
            None, None,
        )


def _scores_times_v(
    qb: Tensor, kb: Tensor, vb: Tensor, mask: Tensor, rel: Tensor | None, buckets: Tensor | None,
    rab: RelativeAttentionBias | None, alpha: float, scaling: int, b: int, h: int,
    compute_dtype: torch.dtype,
) -> Tensor:
    """:func:`padded_attention` with the bias built from the rab indices ``rel``, ``buckets``."""
    bias = None
    if rab is not None:
        bias = bias_from_indices(rab.pos_weights, rab.ts_weights, rel, buckets).to(compute_dtype)
    return padded_attention(qb, kb, vb, mask, bias, alpha, scaling, b, h)


def padded_attention(
    qb: Tensor, kb: Tensor, vb: Tensor, mask: Tensor, bias: Tensor | None, alpha: float,
    scaling: int, b: int, h: int,
) -> Tensor:
    """(SiLU(alpha q k^T + bias) / N masked) v of b padded samples of h heads, the attention
    both layouts run (this kernel's chunks, and ``hstu.serving.model``): qb [b*h, r, d], kb /
    vb [b*h, m, d], mask bool [b, 1, r, m], bias [b or 1, r, m] or None, N = ``scaling`` ->
    [b*h, r, d]."""
    r, m = qb.shape[1], kb.shape[1]
    if bias is not None:
        bias = bias.unsqueeze(1).expand(b, h, r, m).reshape(b * h, r, m)
        scores = torch.baddbmm(bias, qb, kb.transpose(1, 2), alpha=alpha)
    else:
        scores = torch.bmm(qb, kb.transpose(1, 2))
        if alpha != 1.0:
            scores = scores * alpha
    weights = torch.where(mask, F.silu(scores.view(b, h, r, m)), 0.0).view(b * h, r, m)
    # 1/N on the [b*h, r, d] output instead of the [b*h, r, m] weights
    return torch.bmm(weights, vb) / scaling


def _to_heads_first(x: Tensor, c: _Chunk, dtype: torch.dtype) -> Tensor:
    """[T, H, d] -> the chunk's padded [h * b, n, d] (heads first: one gather, no copy after)."""
    b, n = c.token_index.shape
    g = x.index_select(0, c.flat_index).to(dtype).transpose(0, 1).contiguous()  # [H, b*n, d]
    return g.view(g.shape[0] * b, n, -1)


def _from_heads_first(x: Tensor, c: _Chunk, out: Tensor) -> None:
    """The chunk's [h * b, n, d] values at its valid slots, written into ``out`` [T, H, d]."""
    h = out.shape[1]
    valid = x.view(h, -1, x.shape[-1]).index_select(1, c.valid_index)  # [H, tokens, d]
    out.transpose(0, 1).index_copy_(1, c.rows, valid.to(out.dtype))


class _DenseChunksAttention(torch.autograd.Function):
    """The attention of a batch whose chunks are all dense (no row blocks), heads first.

    :func:`padded_attention` per chunk (the same values up to rounding), with the layout
    and the autograd bookkeeping done by hand: each chunk's q, k, v gathered in one pass into
    [h * b, n, d], its output and gradients written straight to their tokens (every token
    lies in exactly one chunk: no zero-filled [T, H, d] buffer to add into), the rab added in
    place to the scores (no copy of it per head) and its gradient summed over the heads once,
    the mask added to the scores with the rab (``_HIDDEN_SCORE``: no masked fill of the
    weights, nor of their gradient). Keeps each chunk's q, k, v, scores and SiLU (autograd kept
    those and the mask). On the ML-100K preset's batch shapes (one CPU thread) forward and
    backward are 1.35-1.4x as fast as the same ops through autograd
    (``scripts/bench_attention_paths.py``)."""

    @staticmethod
    def forward(ctx, q, k, v, pos_weights, ts_weights, chunks, alpha, scaling):
        compute = torch.promote_types(q.dtype, torch.float32)
        num_tokens, h = q.shape[0], q.shape[1]
        # every token of a sample lies in one chunk; tokens past offsets[B] (if any) stay 0
        covered = sum(c.rows.shape[0] for c in chunks) == num_tokens
        out = (q.new_empty if covered else q.new_zeros)(num_tokens, h, v.shape[2], dtype=compute)
        saved = []
        for c in chunks:
            b = c.token_index.shape[0]
            qb, kb, vb = (_to_heads_first(x, c, compute) for x in (q, k, v))
            parts = c.parts or [(slice(None), slice(None), c.mask, c.rel, c.buckets)]
            # each part's rows written in place (no cat of the parts)
            chunk_out = qb.new_empty(qb.shape[0], qb.shape[1], vb.shape[2])
            kept = []
            for index, (rows, keys, mask, rel, buckets) in enumerate(parts):
                qp, kp, vp = qb[:, rows], kb[:, keys], vb[:, keys]
                r, m = qp.shape[1], kp.shape[1]
                scores = torch.bmm(qp, kp.transpose(1, 2))
                if alpha != 1.0:
                    scores.mul_(alpha)
                # the mask as added scores (_HIDDEN_SCORE): SiLU gives -0.0 there, and 0 in
                # backward
                add = c.added_mask(index, mask, compute)
                if pos_weights is not None:
                    # inside forward no gradient is recorded: the plain lookups
                    bias = bias_from_indices(
                        pos_weights.to(compute),
                        None if ts_weights is None else ts_weights.to(compute), rel, buckets)
                    # [b, r, m] with time buckets, [1, r, m] from positions alone
                    add = bias.add_(add) if bias.shape == add.shape else bias + add
                scores.view(h, b, r, m).add_(add.unsqueeze(0))
                weights = F.silu(scores)
                torch.bmm(weights, vp, out=chunk_out[:, rows])
                kept.append((scores, weights))
            _from_heads_first(chunk_out.div_(scaling), c, out)
            saved += [qb, kb, vb, *(t for part in kept for t in part)]
        ctx.chunks, ctx.alpha, ctx.scaling = chunks, alpha, scaling
        # through save_for_backward (not ctx attributes): saved-tensor hooks see them
        ctx.save_for_backward(pos_weights, ts_weights, *saved)
        ctx.shapes = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype)
        ctx.covered = covered
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        pos_weights, ts_weights, *saved = ctx.saved_tensors
        q_shape, k_shape, v_shape, q_dtype, k_dtype, v_dtype = ctx.shapes
        alpha, scaling = ctx.alpha, ctx.scaling
        h = q_shape[1]
        alloc = grad_out.new_empty if ctx.covered else grad_out.new_zeros
        dq, dk, dv = (alloc(s, dtype=t) for s, t in
                      ((q_shape, q_dtype), (k_shape, k_dtype), (v_shape, v_dtype)))
        need_pos = pos_weights is not None and ctx.needs_input_grad[3]
        need_ts = ts_weights is not None and ctx.needs_input_grad[4]
        compute = torch.promote_types(q_dtype, torch.float32)
        dpos = grad_out.new_zeros(pos_weights.shape, dtype=compute) if need_pos else None
        dts = grad_out.new_zeros(ts_weights.shape, dtype=compute) if need_ts else None
        at = 0
        for c in ctx.chunks:
            b = c.token_index.shape[0]
            go = _to_heads_first(grad_out, c, compute).div_(scaling)
            parts = c.parts or [(slice(None), slice(None), c.mask, c.rel, c.buckets)]
            qb, kb, vb = saved[at : at + 3]
            kept = [saved[at + 3 + 2 * i : at + 5 + 2 * i] for i in range(len(parts))]
            at += 3 + 2 * len(parts)
            # the last part sees every key (the whole chunk, or the split's lower rows): its
            # key gradients are the chunk's, the first part's are added into their slice; the
            # query gradients of each part's rows written in place
            dqb = qb.new_empty(qb.shape)
            dkb = dvb = None
            for (rows, keys, _mask, rel, buckets), (scores, weights) in reversed(
                list(zip(parts, kept))
            ):
                gp = go[:, rows]
                r, m = scores.shape[1], scores.shape[2]
                if dvb is None:
                    assert m == kb.shape[1], "the last part must see every key"
                    dvb = torch.bmm(weights.transpose(1, 2), gp)
                else:
                    dvb[:, keys].baddbmm_(weights.transpose(1, 2), gp)
                # 0 at the hidden pairs: SiLU's derivative at _HIDDEN_SCORE
                dscores = torch.ops.aten.silu_backward(
                    torch.bmm(gp, vb[:, keys].transpose(1, 2)), scores)
                if dpos is not None or dts is not None:
                    dbias = dscores.view(h, b, r, m).sum(0)  # [b, R, K]
                    if dpos is not None:
                        dpos.scatter_add_(0, rel.reshape(-1), dbias.sum(0).reshape(-1))
                    if dts is not None:
                        dts.scatter_add_(0, buckets.reshape(-1), dbias.reshape(-1))
                if alpha != 1.0:
                    dscores.mul_(alpha)
                torch.bmm(dscores, kb[:, keys], out=dqb[:, rows])
                if dkb is None:
                    dkb = torch.bmm(dscores.transpose(1, 2), qb[:, rows])
                else:
                    dkb[:, keys].baddbmm_(dscores.transpose(1, 2), qb[:, rows])
            _from_heads_first(dqb, c, dq)
            _from_heads_first(dkb, c, dk)
            _from_heads_first(dvb, c, dv)
        return (
            dq, dk, dv,
            None if dpos is None else dpos.to(pos_weights.dtype),
            None if dts is None else dts.to(ts_weights.dtype),
            None, None, None,
        )


def _recomputed_scores_times_v(*args) -> Tensor:
    """:func:`_scores_times_v` keeping only its inputs for backward (which recomputes it)."""
    return checkpoint(_scores_times_v, *args, use_reentrant=False)


def pytorch_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    max_seqlen: int,
    *,
    memory_budget_bytes: int | None = None,
    dense_by_hand: bool = True,
    **options: Any,
) -> Tensor:
    """O = (SiLU(alpha Q K^T + rab) / N masked) V, sample by sample; the arguments of
    ``hstu.ops.hstu_attention`` (``options``: the fields of ``AttentionOptions``).

    Lengths come from ``offsets`` (``max_seqlen`` is not read); chunks and row blocks: the
    module docstring.

    Args:
        memory_budget_bytes: cap on the float32 score tensors of one chunk; a sample over it
            is computed in row blocks that fit it, recomputed in backward instead of saved.
            When the chunks' score tensors kept for backward would together exceed it, each
            chunk's are recomputed in backward too.
        dense_by_hand: a batch of dense chunks in one autograd function
            (``_DenseChunksAttention``); False: through autograd's ops, as a batch with row
            blocks (the same values up to rounding; for tests and
            ``scripts/bench_attention_paths.py``).

    Returns:
        [T, H, d_v] in q's dtype.
    """
    del max_seqlen
    o = AttentionOptions(**options)
    rab, alpha = o.rab, o.alpha
    budget = memory_budget_bytes or DEFAULT_MEMORY_BUDGET_BYTES
    num_tokens, num_heads, _head_dim = q.shape
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    chunks = _plan(offsets, num_heads, budget, o)
    out = q.new_zeros(num_tokens, num_heads, v.shape[2], dtype=compute_dtype)
    pieces: list[Tensor] = []
    ids: list[Tensor] = []
    h = num_heads
    # autograd keeps every dense chunk's score tensors until backward: when together they
    # exceed the budget, each chunk's scores are recomputed in backward instead (the same
    # ops again: the same values), so a call keeps at most about one chunk's
    recording = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    kept = sum(
        c.token_index.shape[0] * h * c.token_index.shape[1] ** 2
        * _SCORE_BYTES * _SCORE_TENSORS_ALIVE
        for c in chunks if c.blocked is None
    )
    recompute = recording and kept > budget
    if dense_by_hand and chunks and not recompute and all(c.blocked is None for c in chunks):
        return _DenseChunksAttention.apply(
            q, k, v, None if rab is None else rab.pos_weights,
            None if rab is None else rab.ts_weights, chunks, alpha, o.scaling_seqlen,
        )
    scores_times_v = _recomputed_scores_times_v if recompute else _scores_times_v
    for c in chunks:
        b, n = c.token_index.shape

        def padded(x: Tensor, c: _Chunk = c, b: int = b, n: int = n) -> Tensor:
            # [T, H, d] -> [b * h, n, d]; index_select's backward is an index_add
            g = x.index_select(0, c.flat_index)
            return g.view(b, n, h, -1).transpose(1, 2).reshape(b * h, n, -1).to(compute_dtype)

        qb, kb, vb = padded(q), padded(k), padded(v)
        if c.blocked is not None:
            chunk_out = _BlockedAttention.apply(
                qb, kb, vb, None if rab is None else rab.pos_weights,
                None if rab is None else rab.ts_weights, c.blocked, alpha,
            ) / o.scaling_seqlen
        elif c.parts is None:
            chunk_out = scores_times_v(
                qb, kb, vb, c.mask, c.rel, c.buckets, rab, alpha, o.scaling_seqlen, b, h,
                compute_dtype,
            )
        else:
            chunk_out = torch.cat(
                [
                    scores_times_v(qb[:, rows_], kb[:, keys_], vb[:, keys_], mask, rel, buckets,
                                   rab, alpha, o.scaling_seqlen, b, h, compute_dtype)
                    for rows_, keys_, mask, rel, buckets in c.parts
                ],
                dim=1,
            )
        chunk_out = chunk_out.view(b, h, n, -1).transpose(1, 2).reshape(b * n, h, -1)
        pieces.append(chunk_out.index_select(0, c.valid_index))
        ids.append(c.rows)
    if pieces:
        out = out.index_copy(0, torch.cat(ids), torch.cat(pieces))
    return out.to(q.dtype)
