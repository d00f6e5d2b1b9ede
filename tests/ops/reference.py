"""Test helpers: random jagged batches and a deliberately naive dense reference.

Legend: T total tokens, B samples, H heads, d head dim, L[b] sample lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hstu.ops import RelativeAttentionBias, lengths_to_offsets
from hstu.ops.masks import check_mask_convention, check_window


@dataclass
class JaggedCase:
    q: Tensor  # [T, H, d]
    k: Tensor
    v: Tensor
    offsets: Tensor  # int64 [B + 1]
    max_seqlen: int
    num_contextual: Tensor | None  # int64 [B]
    num_targets: Tensor | None  # int64 [B]
    rab: RelativeAttentionBias | None

    def leaves(self) -> list[Tensor]:
        out = [self.q, self.k, self.v]
        if self.rab is not None:
            out.append(self.rab.pos_weights)
            if self.rab.ts_weights is not None:
                out.append(self.rab.ts_weights)
        return out


def random_case(
    lengths: list[int],
    num_heads: int = 2,
    head_dim: int = 16,
    *,
    num_contextual: list[int] | None = None,
    num_targets: list[int] | None = None,
    rab: str = "none",  # "none" | "pos" | "pos+ts" | "pos+ts+qt" (with query times)
    max_positions: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> JaggedCase:
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    offsets = lengths_to_offsets(lengths_t)
    total = int(offsets[-1])

    def leaf(*shape: int, scale: float = 1.0) -> Tensor:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return x.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = (leaf(total, num_heads, head_dim) for _ in range(3))
    bias = None
    if rab != "none":
        num_pos = max_positions or max(lengths)
        ts_w = leaf(129, scale=0.5) if rab.startswith("pos+ts") else None
        stamps = query = None
        if ts_w is not None:
            gaps = torch.randint(0, 5000, (total,), generator=gen)
            gaps[torch.rand(total, generator=gen) < 0.2] = 0  # equal timestamps happen
            stamps = gaps.cumsum(0)
            if rab == "pos+ts+qt":
                # each sample's query comes 1 s to ~3 years after its last event
                last = stamps[(offsets[1:] - 1).clamp(min=0)]
                wait = (10.0 ** (torch.rand(len(lengths), generator=gen) * 8)).to(torch.int64)
                query = (last + wait).to(device)
            stamps = stamps.to(device)
        bias = RelativeAttentionBias(leaf(2 * num_pos - 1, scale=0.5), ts_w, stamps, query)

    def counts(values: list[int] | None) -> Tensor | None:
        return None if values is None else torch.tensor(values, dtype=torch.int64, device=device)

    return JaggedCase(
        q,
        k,
        v,
        offsets.to(device),
        max(lengths),
        counts(num_contextual),
        counts(num_targets),
        bias,
    )


def allowed(
    i: int, j: int, length: int, num_contextual: int, num_targets: int, target_group_size: int,
    causal: bool, mask_convention: str = "hstu", max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
) -> bool:
    """The mask rule for one (query i, key j) pair of one sample, in plain Python: written
    as the docstring of :mod:`hstu.ops.masks` states it, the oracle the kernels' masks are
    tested against."""
    check_mask_convention(mask_convention)
    check_window(max_attn_len, min_full_attn_seq_len)
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
        base = True
    elif i < first_candidate:
        base = peer
    else:
        base = (i - first_candidate) // target_group_size == (
            (j - first_candidate) // target_group_size
        )
    if not base or max_attn_len == 0:
        return base
    if (i < num_contextual and j < first_candidate) or (not peer and j < num_contextual):
        return True
    if min_full_attn_seq_len > 0 and window_position(i, num_contextual, first_candidate) >= (
        first_candidate - min_full_attn_seq_len
    ):
        return True
    distance = window_position(i, num_contextual, first_candidate) - window_position(
        j, num_contextual, first_candidate
    )
    return abs(distance) <= max_attn_len


def window_position(t: int, num_contextual: int, first_candidate: int) -> int:
    """pos(t) of the semi-local rule (module docstring)."""
    if t < num_contextual:
        return num_contextual - 1
    return min(t, first_candidate)


def naive_mask(
    length: int, num_ctx: int, num_tgt: int, group: int, causal: bool, convention: str = "hstu",
    max_attn_len: int = 0, min_full_attn_seq_len: int = 0,
) -> Tensor:
    """bool [L, L] built pair by pair from the written rule."""
    return torch.tensor(
        [
            [
                allowed(i, j, length, num_ctx, num_tgt, group, causal, convention,
                        max_attn_len, min_full_attn_seq_len)
                for j in range(length)
            ]
            for i in range(length)
        ],
        dtype=torch.bool,
    )


def _naive_bucket(delta: int) -> int:
    return min(max(math.floor(math.log(max(abs(delta), 1)) / 0.301), 0), 128)


def naive_attention(
    case: JaggedCase,
    *,
    alpha: float,
    scaling_seqlen: int,
    causal: bool = True,
    target_group_size: int = 1,
    masks: list[Tensor] | None = None,
    mask_convention: str = "hstu",
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
) -> Tensor:
    """Sample by sample, dense, float64, masks and bias built element by element; ``masks``
    (bool [L, L] per sample, e.g. written by hand) replace the rule's."""
    offsets = case.offsets.tolist()
    outs = []
    for b in range(len(offsets) - 1):
        start, end = offsets[b], offsets[b + 1]
        length = end - start
        nc = int(case.num_contextual[b]) if case.num_contextual is not None else 0
        nt = int(case.num_targets[b]) if case.num_targets is not None else 0
        q, k, v = (x[start:end].double() for x in (case.q, case.k, case.v))
        scores = alpha * torch.einsum("ihd,jhd->hij", q, k)
        if case.rab is not None:
            num_pos = case.rab.max_positions
            rel = torch.tensor(
                [[num_pos - 1 + j - i for j in range(length)] for i in range(length)]
            )
            bias = case.rab.pos_weights.double()[rel]
            if case.rab.ts_weights is not None:
                t = case.rab.timestamps[start:end].tolist()
                t_next = t[1:] + t[-1:]
                if case.rab.query_timestamps is not None and length > 0:
                    t_next[-1] = int(case.rab.query_timestamps[b])
                buckets = torch.tensor(
                    [
                        [_naive_bucket(t_next[i] - t[j]) for j in range(length)]
                        for i in range(length)
                    ]
                )
                bias = bias + case.rab.ts_weights.double()[buckets]
            scores = scores + bias
        if masks is not None:
            mask = masks[b].to(scores.device)
        else:
            mask = naive_mask(length, nc, nt, target_group_size, causal, mask_convention,
                              max_attn_len, min_full_attn_seq_len).to(scores.device)
        weights = torch.nn.functional.silu(scores) / scaling_seqlen * mask
        outs.append(torch.einsum("hij,jhd->ihd", weights, v))
    return torch.cat(outs)


def grads(out: Tensor, leaves: list[Tensor], seed: int = 1) -> list[Tensor]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, leaves, upstream.to(out)))
