"""Relative attention bias (the HSTU paper's research model), as kernel inputs.

Legend: T total tokens (jagged), b samples of one padded group, n padded width,
P the longest sample the position table was sized for, NB = 129 time buckets.

    rab[i, j] = pos_weights[P - 1 + j - i] + ts_weights[bucket(t_next[i] - t[j])]
    bucket(x) = clamp(floor(ln(max(|x|, 1)) / 0.301), 0, 128)          (natural log, fp32)
    t_next[i] = t[i + 1], and for the last token of a sample (i = L - 1) the sample's query
                time when ``query_timestamps`` is given, else t[L - 1]

One table per layer, shared by all heads, added to alpha * Q K^T before the SiLU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_TIME_BUCKETS = 129
TIME_BUCKET_LOG_DIVISOR = 0.301


@dataclass
class RelativeAttentionBias:
    """Inputs of the relative attention bias; the bias itself is computed inside the kernel.

    Attributes:
        pos_weights: float [2 * P - 1]; ``pos_weights[P - 1 + j - i]`` biases query i, key j.
            Every sample must have at most P tokens.
        ts_weights: float [NB = 129] time-bucket weights, or None for a position-only bias.
        timestamps: int64 [T] jagged, aligned with q; required iff ``ts_weights`` is set.
        query_timestamps: int64 [B] or None: each sample's query time, the next time of its
            last token (retrieval's ``NetworkArgs.rab_query_time``); None: the last token's
            own timestamp. Only with ``timestamps``.
    """

    pos_weights: Tensor
    ts_weights: Tensor | None = None
    timestamps: Tensor | None = None
    query_timestamps: Tensor | None = None

    @property
    def max_positions(self) -> int:
        """P: the longest sample the position table covers."""
        return (self.pos_weights.numel() + 1) // 2

    def validate(self, num_tokens: int, max_seqlen: int, num_samples: int | None = None) -> None:
        if self.pos_weights.dim() != 1 or self.pos_weights.numel() % 2 != 1:
            raise ValueError(
                "rab.pos_weights must be 1-D of odd length 2*P-1, got "
                f"{tuple(self.pos_weights.shape)}"
            )
        if max_seqlen > self.max_positions:
            raise ValueError(
                f"rab.pos_weights covers samples of up to P={self.max_positions} tokens, "
                f"but max_seqlen={max_seqlen}"
            )
        if (self.ts_weights is None) != (self.timestamps is None):
            raise ValueError("rab.ts_weights and rab.timestamps must be given together")
        if self.ts_weights is not None:
            if self.ts_weights.shape != (NUM_TIME_BUCKETS,):
                raise ValueError(
                    f"rab.ts_weights must have shape [{NUM_TIME_BUCKETS}], "
                    f"got {tuple(self.ts_weights.shape)}"
                )
            assert self.timestamps is not None
            if self.timestamps.shape != (num_tokens,):
                raise ValueError(
                    f"rab.timestamps must have shape [T={num_tokens}], "
                    f"got {tuple(self.timestamps.shape)}"
                )
        if self.query_timestamps is not None:
            if self.timestamps is None:
                raise ValueError("rab.query_timestamps needs rab.timestamps and rab.ts_weights")
            if self.query_timestamps.dim() != 1 or (
                num_samples is not None and self.query_timestamps.numel() != num_samples
            ):
                raise ValueError(
                    f"rab.query_timestamps must have shape [B={num_samples}], "
                    f"got {tuple(self.query_timestamps.shape)}"
                )


def time_bucket(delta: Tensor) -> Tensor:
    """int64 time differences (any shape) -> int64 bucket ids in [0, NB - 1], same shape."""
    magnitude = delta.abs().clamp(min=1).to(torch.float32)
    bucket = torch.floor(torch.log(magnitude) / TIME_BUCKET_LOG_DIVISOR).to(torch.int64)
    return bucket.clamp(0, NUM_TIME_BUCKETS - 1)


def relative_positions(rows: Tensor, keys: Tensor, num_positions: int) -> Tensor:
    """int64 [..., R, K]: row of ``pos_weights`` for query token ``rows`` [R] (or [b, R]) and
    key token ``keys`` [K] (P - 1 + j - i, clamped)."""
    return (num_positions - 1 + keys.unsqueeze(-2) - rows.unsqueeze(-1)).clamp(
        0, 2 * num_positions - 2
    )


def next_timestamps(
    ts: Tensor, lengths: Tensor, query_timestamps: Tensor | None = None
) -> Tensor:
    """t_next [b, n] of padded timestamps ``ts`` [b, n]: t[i + 1], and for a sample's last
    token (``lengths`` [b] tokens) its query time ``query_timestamps`` [b] when given, else
    its own."""
    pos = torch.arange(ts.shape[1], device=ts.device).view(1, -1)
    last = (lengths.view(-1, 1) - 1).clamp(min=0)
    ts_next = torch.gather(ts, 1, torch.minimum(pos + 1, last))
    if query_timestamps is not None:
        ts_next = torch.where(pos == last, query_timestamps.view(-1, 1), ts_next)
    return ts_next


# CPU: the buckets are built a few samples at a time in reused scratch (each op in place, the
# working set in cache) instead of eight passes over fresh [b, n, n] tensors: ~8x faster.
_BUCKET_CHUNK_ELEMENTS = 1 << 16


def time_buckets(
    timestamps: Tensor,
    token_index: Tensor,
    lengths: Tensor,
    rows: slice = slice(None),
    keys: slice | Tensor = slice(None),
    query_timestamps: Tensor | None = None,
) -> Tensor:
    """int64 [b, n, n]: bucket(t_next[i] - t[j]) for a padded group of samples; with ``rows``
    / ``keys`` (a slice, or int64 key slots) only that block of it ([b, len(rows),
    len(keys)], the same values).
    ``query_timestamps`` int64 [b]: the group's query times, the last token's t_next."""
    ts = timestamps[token_index]
    ts_next = next_timestamps(ts, lengths, query_timestamps)[:, rows]
    ts = ts[:, keys]
    if ts.device.type != "cpu":
        return time_bucket(ts_next.unsqueeze(2) - ts.unsqueeze(1))
    b, n_rows, n_keys = ts.shape[0], ts_next.shape[1], ts.shape[1]
    out = torch.empty((b, n_rows, n_keys), dtype=torch.int64)
    step = max(1, _BUCKET_CHUNK_ELEMENTS // max(1, n_rows * n_keys))
    diff = torch.empty((min(step, b), n_rows, n_keys), dtype=torch.int64)
    magnitude = torch.empty(diff.shape, dtype=torch.float32)
    for s in range(0, b, step):
        e = min(b, s + step)
        d, m = diff[: e - s], magnitude[: e - s]
        # the same operations in the same dtypes as time_bucket: identical buckets
        torch.sub(ts_next[s:e].unsqueeze(2), ts[s:e].unsqueeze(1), out=d)
        d.abs_().clamp_(min=1)
        m.copy_(d)
        m.log_().div_(TIME_BUCKET_LOG_DIVISOR).floor_()
        out[s:e].copy_(m).clamp_(0, NUM_TIME_BUCKETS - 1)
    return out


def bias_from_indices(
    pos_weights: Tensor, ts_weights: Tensor | None, rel: Tensor, buckets: Tensor | None
) -> Tensor:
    """The bias from precomputed indices (:func:`relative_positions`, :func:`time_buckets`):
    float [b, R, K] (or [1, R, K] when position-only and ``rel`` is [R, K]); differentiable
    w.r.t. both tables."""
    bias = table_lookup(pos_weights, rel)
    if bias.dim() == 2:
        bias = bias.unsqueeze(0)
    if ts_weights is not None:
        assert buckets is not None
        bias = bias + table_lookup(ts_weights, buckets)
    return bias


class _TableLookup(torch.autograd.Function):
    """table[index] for a small 1-D table and a large index: ``index_select`` forward (~3x
    ``take`` on CPU) and a ``scatter_add`` backward (several times faster on CPU than
    indexing's gather and its accumulating index_put backward; the same sums)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.size = table.numel()
        return table.index_select(0, index.reshape(-1)).view(index.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        grad_table = grad.new_zeros(ctx.size).scatter_add_(
            0, index.reshape(-1), grad.contiguous().reshape(-1)
        )
        return grad_table, None


def table_lookup(table: Tensor, index: Tensor) -> Tensor:
    """1-D ``table`` at int64 ``index`` (any shape), differentiable w.r.t. the table."""
    if not (torch.is_grad_enabled() and table.requires_grad):  # inference, export: plain op
        return table.index_select(0, index.reshape(-1)).view(index.shape)
    return _TableLookup.apply(table, index)


def padded_bias(rab: RelativeAttentionBias, token_index: Tensor, lengths: Tensor) -> Tensor:
    """Dense bias for a padded group of samples (differentiable w.r.t. both tables).

    Args:
        rab: the bias inputs.
        token_index: int64 [b, n] jagged index of each padded slot (any valid index on padding).
        lengths: int64 [b] tokens per sample.
        With ``rab.query_timestamps`` the b rows must be the B samples in order.

    Returns:
        float [b, n, n] (or [1, n, n] when position-only): bias[s, i, j]; values at padded
        rows/columns are finite but meaningless (callers mask them).
    """
    slots = torch.arange(token_index.shape[1], device=token_index.device)
    rel = relative_positions(slots, slots, rab.max_positions)
    buckets = None
    if rab.ts_weights is not None:
        assert rab.timestamps is not None
        buckets = time_buckets(
            rab.timestamps, token_index, lengths, query_timestamps=rab.query_timestamps
        )
    return bias_from_indices(rab.pos_weights, rab.ts_weights, rel, buckets)
