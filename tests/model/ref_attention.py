"""A tiny dense HSTU attention used by the model tests only while ``hstu.ops`` is absent.

It follows the signature of ``hstu.ops.hstu_attention`` and DESIGN.md "Model" (mask and
relative attention bias) with a plain per-sample loop; it is slow and only for tiny shapes.
Once ``hstu.ops`` exists, :func:`ensure_ops` does nothing and the real op is used.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RelativeAttentionBias:
    pos_weights: torch.Tensor
    ts_weights: torch.Tensor | None = None
    timestamps: torch.Tensor | None = None


def attention_mask(
    n: int, num_contextual: int, num_targets: int, target_group_size: int, causal: bool
) -> torch.Tensor:
    """[n, n] bool, True where query i may attend to key j."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    hist_end = n - num_targets
    mask = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
    mask = mask | ((i < num_contextual) & (j < num_contextual))
    j_cand = j >= hist_end
    same_group = (i >= hist_end) & (
        torch.div(i - hist_end, target_group_size, rounding_mode="floor")
        == torch.div(j - hist_end, target_group_size, rounding_mode="floor")
    )
    return torch.where(j_cand, same_group & (j <= i), mask)


def time_bucket(delta: torch.Tensor) -> torch.Tensor:
    d = delta.abs().clamp(min=1).to(torch.float32)
    return torch.clamp(torch.floor(torch.log(d) / 0.301), 0, 128).long()


def dense_hstu_attention(
    q, k, v, offsets, max_seqlen, *, alpha, scaling_seqlen, causal=True, num_contextual=None,
    num_targets=None, target_group_size=1, rab=None, backend="pytorch", strict=False,
):
    out = []
    bsz = offsets.numel() - 1
    for b in range(bsz):
        s, e = int(offsets[b]), int(offsets[b + 1])
        n = e - s
        nc = int(num_contextual[b]) if num_contextual is not None else 0
        nt = int(num_targets[b]) if num_targets is not None else 0
        qb, kb, vb = q[s:e], k[s:e], v[s:e]  # [n, H, d]
        scores = alpha * torch.einsum("ihd,jhd->hij", qb, kb)
        if rab is not None:
            num_pos = (rab.pos_weights.numel() + 1) // 2
            idx = torch.arange(n)[None, :] - torch.arange(n)[:, None] + num_pos - 1
            bias = rab.pos_weights[idx.clamp(0, 2 * num_pos - 2)]
            if rab.ts_weights is not None:
                t = rab.timestamps[s:e]
                t_next = torch.cat([t[1:], t[-1:]])
                bias = bias + rab.ts_weights[time_bucket(t_next[:, None] - t[None, :])]
            scores = scores + bias[None]
        mask = attention_mask(n, nc, nt, target_group_size, causal)
        a = F.silu(scores) / scaling_seqlen * mask[None].to(scores.dtype)
        out.append(torch.einsum("hij,jhd->ihd", a, vb))
    return torch.cat(out, 0) if out else q.new_zeros(q.shape)


def ensure_ops() -> None:
    """Installs this fallback as ``hstu.ops`` when the real package is not there yet."""
    try:
        ops = importlib.import_module("hstu.ops")
        if hasattr(ops, "hstu_attention") and hasattr(ops, "RelativeAttentionBias"):
            return
    except ImportError:
        pass
    mod = types.ModuleType("hstu.ops")
    mod.hstu_attention = dense_hstu_attention
    mod.RelativeAttentionBias = RelativeAttentionBias
    mod.__dict__["_IS_TEST_FALLBACK"] = True
    sys.modules["hstu.ops"] = mod
    import hstu

    hstu.ops = mod  # type: ignore[attr-defined]

