"""Causal softmax attention over jagged tokens (SASRec's), one dense call per chunk of samples
of similar lengths: no sample is padded beyond its chunk's longest.

Legend: T tokens, B samples, H heads, d head width, b samples of one chunk, n its width (its
longest sample), t_c its real tokens.

Samples are grouped as the HSTU reference backend groups them
(:func:`hstu.ops.pytorch_attention.plan_chunks`: longest first, a chunk of width n takes
samples longer than n / 2 only, within a memory budget on its score tensors), so padding at
most doubles a chunk's rows. Inside a chunk a sample's tokens come first and its padding after
them: under the causal mask no real token sees the padding, so
``scaled_dot_product_attention(is_causal=True)`` needs no key-padding mask, and padded rows
are never read back. The plan is built once per batch on the host (one named host sync on
CUDA) and shared by the block's layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

from hstu.ops.jagged import index_within, segment_ids
from hstu.ops.pytorch_attention import DEFAULT_MEMORY_BUDGET_BYTES, plan_chunks
from hstu.sync_audit import allowed_sync

CHUNK_PLAN_SYNC = "causal softmax attention: chunk plan from the lengths, once per batch"


@dataclass(frozen=True)
class CausalChunk:
    """b samples padded to n slots each."""

    num_samples: int  # b
    width: int  # n
    gather: Tensor  # int64 [b * n]: the token at each slot (its sample's first on padding)
    valid: Tensor  # int64 [t_c]: the slots holding real tokens, sample after sample


@dataclass(frozen=True)
class CausalChunks:
    """A batch's chunks, and ``order`` int64 [T]: each token's row among the chunks' real
    rows concatenated in chunk order."""

    chunks: list[CausalChunk]
    order: Tensor


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host-built index on ``device``; from pinned memory, so no sync on CUDA."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def plan_causal_chunks(
    offsets: Tensor, num_heads: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
) -> CausalChunks:
    """The chunks of the samples of ``offsets`` int64 [B+1] (module docstring); the lengths are
    read on the host (``CHUNK_PLAN_SYNC``), the indices built there and copied over."""
    with allowed_sync(CHUNK_PLAN_SYNC):
        host_offsets = offsets.tolist()
    host_lengths = [end - start for start, end in pairwise(host_offsets)]
    starts = torch.tensor(host_offsets[:-1], dtype=torch.int64)
    lengths = torch.tensor(host_lengths, dtype=torch.int64)
    chunks, rows = [], []
    for samples, width, _ in plan_chunks(host_lengths, num_heads, memory_budget_bytes):
        ids = torch.tensor(samples, dtype=torch.int64)
        chunk_lengths, chunk_starts = lengths[ids], starts[ids]
        slot = torch.arange(width)
        real = slot.view(1, -1) < chunk_lengths.view(-1, 1)
        gather = torch.where(real, chunk_starts.view(-1, 1) + slot, chunk_starts.view(-1, 1))
        tokens = sum(host_lengths[s] for s in samples)
        seg = segment_ids(chunk_lengths, tokens)
        within = index_within(chunk_lengths, tokens)
        rows.append(chunk_starts[seg] + within)
        chunks.append(CausalChunk(
            len(samples), width, _to_device(gather.reshape(-1), offsets.device),
            _to_device(seg * width + within, offsets.device),
        ))
    total = host_offsets[-1]
    all_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    order = torch.empty(total, dtype=torch.int64).index_copy_(0, all_rows, torch.arange(total))
    return CausalChunks(chunks, _to_device(order, offsets.device))


def causal_softmax_attention(qkv: Tensor, plan: CausalChunks, dropout_p: float = 0.0) -> Tensor:
    """softmax(Q K^T / sqrt(d) + causal mask) V of each sample: qkv [T, 3, H, d] (each token's
    Q, K, V) -> [T, H, d]; ``dropout_p`` on the attention weights (0 outside training)."""
    _, _, num_heads, head_dim = qkv.shape
    pieces = []
    for c in plan.chunks:
        b, n = c.num_samples, c.width
        chunk = qkv.index_select(0, c.gather).view(b, n, 3, num_heads, head_dim)
        q, k, v = chunk.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, H, n, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(b * n, num_heads, head_dim)
        pieces.append(out.index_select(0, c.valid))
    if not pieces:
        return qkv.new_zeros(0, num_heads, head_dim)
    return torch.cat(pieces).index_select(0, plan.order)


__all__ = [
    "CHUNK_PLAN_SYNC",
    "CausalChunk",
    "CausalChunks",
    "causal_softmax_attention",
    "plan_causal_chunks",
]
