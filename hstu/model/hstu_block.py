"""A stack of HSTU layers with the input scaling and learned position embedding.

Legend: T jagged tokens, B samples, D hidden width, n_b tokens of sample b, c_b its candidate
(target) tokens.

Positions: token t of sample b gets position min(t, n_b - c_b) (candidates share the position of
the first candidate, so their order carries nothing), clamped to ``num_position_buckets - 1``.

Attention truncation (``attn_truncation_layers`` k > 0, ``attn_truncation_len`` T): layers 1..k
run over every token; layers k+1.. over each sample's last min(n_b, T) tokens only, a jagged
slice starting at max(0, n_b - T). The slice is a plain suffix: contextual tokens stay only
where they fall inside it (they lead the slice then, and keep their contextual rule), the
candidates are the slice's last c_b tokens (c_b <= T is required). Tokens before the slice
keep their layer-k output, so every position still has a state and the heads read the same
rows; their gradient reaches the input through layers 1..k only. N (``scaling_seqlen``) stays
the block's. docs/model.md "Long histories".
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hstu.model.hstu_layer import HSTULayer, LayerOptions
from hstu.ops.dropout import Dropout
from hstu.ops.jagged import (
    index_within,
    lengths_to_offsets,
    positions_within,
    segment_ids,
)
from hstu.sync_audit import allowed_sync

TRUNCATION_SYNC = (
    "attention truncation of a batch without host-side sizes (built by hand): the upper "
    "layers' slice (its token count) and the candidates check read from the device"
)


def to_padded(
    x: torch.Tensor, offsets: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged tokens x [T, D] of offsets [B+1] -> (padded [B * W, D] with sample b's tokens
    at rows b * W .. b * W + n_b - 1 and zeros after them, dest int64 [T]: each token's row);
    ``padded.index_select(0, dest)`` is the way back."""
    total = x.shape[0]
    lengths = offsets[1:] - offsets[:-1]
    dest = segment_ids(lengths, total) * width + index_within(lengths, total)
    return x.new_zeros(lengths.numel() * width, x.shape[1]).index_copy(0, dest, x), dest


class SequenceBlock(nn.Module):
    """A sequence block (HSTUBlock, :class:`hstu.model.sasrec.SASRecBlock`): the layers'
    input Dropout(x * sqrt(D) + pos_emb[position]), then ``num_layers`` layers of the
    subclass' ``layer_type``, each ``layer_type(hidden_size, num_heads, head_dim, options,
    **layer_kwargs)``.

    ``options`` (an ``options_type``, with keyword ``overrides`` of single fields) are every
    layer's; ``options.dropout`` is also used on the input embeddings and ``options.dtype``
    is the block's parameter and compute dtype. :meth:`forward` is every block's contract;
    a subclass runs its layers in :meth:`encode`.
    """

    options_type: ClassVar[type]
    layer_type: ClassVar[type[nn.Module]]

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        options: Any = None,
        *,
        num_position_buckets: int = 8192,
        use_position_embedding: bool = True,
        layer_kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.options = options = replace(options or self.options_type(), **overrides)
        self.hidden_size = hidden_size
        self.dtype = options.dtype
        self.num_position_buckets = num_position_buckets
        self.position_embedding = None
        if use_position_embedding:
            self.position_embedding = nn.Embedding(
                num_position_buckets, hidden_size, dtype=options.dtype
            )
            nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.input_dropout = Dropout(options.dropout)
        self.layers = nn.ModuleList(
            self.layer_type(hidden_size, num_heads, head_dim, options, **(layer_kwargs or {}))
            for _ in range(num_layers)
        )

    def embed_at(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Tokens x [..., D] at ``positions`` (int64, x's leading shape; unread, may be None,
        without a position embedding) -> the first layer's input; positions clamped into the
        table."""
        x = x.to(self.dtype) * math.sqrt(self.hidden_size)
        if self.position_embedding is not None:
            assert positions is not None
            x = x + self.position_embedding(positions.clamp(max=self.num_position_buckets - 1))
        return self.input_dropout(x)

    def embed(
        self, x: torch.Tensor, index: torch.Tensor | None, first_target: torch.Tensor | None
    ) -> torch.Tensor:
        """The layers' input, in every layout: Dropout(x * sqrt(D) + pos_emb[position]) of
        tokens x [..., D] at ``index`` [...] inside their sample, whose first candidate is at
        ``first_target`` (broadcast; None: no candidates); position = min(index,
        first_target), clamped into the table (module docstring). ``index`` is unread (may
        be None) without a position embedding."""
        if self.position_embedding is not None and first_target is not None:
            index = torch.minimum(index, first_target)  # type: ignore[arg-type]
        return self.embed_at(x, index)

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        max_seqlen: int,
        num_contextual: torch.Tensor | None = None,
        num_targets: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        query_timestamps: torch.Tensor | None = None,
        truncated_sizes: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x [T, D] token embeddings, offsets int64 [B+1], ``max_seqlen`` (>= every n_b),
        num_contextual / num_targets int64 [B], timestamps int64 [T] -> states [T, D] in
        ``dtype``; ``query_timestamps`` int64 [B]: the next time of each sample's last token
        (rab). ``truncated_sizes``: with attention truncation, (sum_b min(n_b,
        attn_truncation_len), max_b C[b]) known on the host (``BatchSizes.truncated_tokens``,
        from the loader); None reads them from the device (one named host sync). A block
        reads what its layers use of these."""
        positions = None
        if self.position_embedding is not None:
            positions = positions_within(offsets, num_targets, x.shape[0])
        return self.encode(
            self.embed_at(x, positions), offsets, max_seqlen, num_contextual, num_targets,
            timestamps, query_timestamps, truncated_sizes,
        )

    def encode(self, x: torch.Tensor, offsets: torch.Tensor, max_seqlen: int, *rest: Any) -> Any:
        """The layers on the embedded tokens x [T, D]; ``rest``: :meth:`forward`'s arguments
        after ``max_seqlen``, in its order."""
        raise NotImplementedError


class HSTUBlock(SequenceBlock):
    """x -> Dropout(x * sqrt(D) + pos_emb) -> num_layers x HSTULayer.

    The arguments of :class:`SequenceBlock` (``options``: :class:`LayerOptions`), and:
    ``sequence_layout``: "jagged" or "padded" (every sample padded to ``max_seqlen``, as
    padded trainers run; needs causal attention); ``attn_truncation_layers`` and
    ``attn_truncation_len``: attention truncation (module docstring; 0: off); ``tp_group``:
    the layers' tensor-parallel group.
    """

    options_type = LayerOptions
    layer_type = HSTULayer

    def __init__(
        self,
        *args: Any,
        sequence_layout: str = "jagged",
        attn_truncation_layers: int = 0,
        attn_truncation_len: int = 0,
        tp_group: ProcessGroup | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, layer_kwargs={"tp_group": tp_group}, **kwargs)
        num_layers = len(self.layers)
        if attn_truncation_layers != 0:
            if not 0 < attn_truncation_layers < num_layers:
                raise ValueError(
                    f"attn_truncation_layers must be in (0, num_layers={num_layers}), got "
                    f"{attn_truncation_layers}"
                )
            if attn_truncation_len <= 0:
                raise ValueError(
                    f"attn_truncation_len must be > 0 with truncation, got {attn_truncation_len}"
                )
            if sequence_layout != "jagged":
                raise ValueError('attention truncation needs sequence_layout="jagged"')
        if sequence_layout not in ("jagged", "padded"):
            raise ValueError(
                f'sequence_layout must be "jagged" or "padded", got {sequence_layout!r}'
            )
        if sequence_layout == "padded" and not self.options.is_causal:
            raise ValueError('sequence_layout="padded" needs causal attention')
        self.attn_truncation_layers = attn_truncation_layers
        self.attn_truncation_len = attn_truncation_len
        self.sequence_layout = sequence_layout

    def encode(
        self, x: torch.Tensor, offsets: torch.Tensor, max_seqlen: int,
        num_contextual: torch.Tensor | None, num_targets: torch.Tensor | None,
        timestamps: torch.Tensor | None, query_timestamps: torch.Tensor | None,
        truncated_sizes: tuple[int, int] | None,
    ) -> torch.Tensor:
        """The layers on the embedded tokens x [T, D]; the rest: :meth:`forward`'s."""
        dest = None
        if self.sequence_layout == "padded":  # no truncation: every layer runs below
            x, dest, offsets, num_targets, timestamps = self._pad(
                x, offsets, max_seqlen, num_targets, timestamps, query_timestamps
            )
        full = self.attn_truncation_layers or len(self.layers)
        for layer in self.layers[:full]:
            x = layer(
                x, offsets, max_seqlen, num_contextual, num_targets, timestamps,
                query_timestamps=query_timestamps,
            )
        if dest is not None:
            return x.index_select(0, dest)
        if full == len(self.layers):
            return x
        # layers k+1.. over each sample's last attn_truncation_len tokens; the tokens before
        # keep their layer-k state (module docstring)
        rows, sliced_offsets, sliced_ctx, sliced_ts = self._truncate(
            offsets, num_contextual, num_targets, timestamps, truncated_sizes
        )
        y = x[rows]
        for layer in self.layers[full:]:
            y = layer(
                y, sliced_offsets, min(max_seqlen, self.attn_truncation_len), sliced_ctx,
                num_targets, sliced_ts, query_timestamps=query_timestamps,
                scaling_seqlen=max_seqlen,
            )
        return x.index_copy(0, rows, y)

    def _truncate(
        self,
        offsets: torch.Tensor,
        num_contextual: torch.Tensor | None,
        num_targets: torch.Tensor | None,
        timestamps: torch.Tensor | None,
        truncated_sizes: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The truncated layers' slice: (rows [T'] of x it keeps, its offsets, contextual
        counts and timestamps); ``truncated_sizes``: forward's."""
        keep = self.attn_truncation_len
        lengths = offsets[1:] - offsets[:-1]
        start = (lengths - keep).clamp(min=0)  # [B] first kept token of each sample
        kept = lengths - start  # [B] = min(n_b, T)
        if truncated_sizes is not None:
            total, most_targets = truncated_sizes
        else:
            longest_targets = (
                num_targets.max().to(kept.dtype)
                if num_targets is not None and num_targets.numel() > 0
                else kept.new_zeros(())
            )
            with allowed_sync(TRUNCATION_SYNC):
                total, most_targets = torch.stack([kept.sum(), longest_targets]).tolist()
        if most_targets > keep:
            raise ValueError(
                f"attention truncation keeps the last {keep} tokens of each sample "
                f"(NetworkArgs.attn_truncation_len), fewer than a sample's {most_targets} "
                "candidates"
            )
        # token index (in x) of each kept token: its sample's offset + start + index in the slice
        rows = (offsets[:-1] + start)[segment_ids(kept, total)] + index_within(kept, total)
        sliced_ctx = None if num_contextual is None else (num_contextual - start).clamp(min=0)
        sliced_ts = None if timestamps is None else timestamps[rows]
        return rows, lengths_to_offsets(kept), sliced_ctx, sliced_ts

    def _pad(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        width: int,
        num_targets: torch.Tensor | None,
        timestamps: torch.Tensor | None,
        query_timestamps: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every sample padded to ``width`` tokens, as padded trainers run: (x [B * W, D], dest
        [T] (``to_padded``), offsets, num_targets and timestamps of the padded layout).

        Padding goes after each sample's real tokens and counts as extra candidates, so under
        causal attention no real token sees it (a candidate's group only grows by later
        tokens): the real tokens' outputs equal the jagged ones. Costs B * W tokens.
        Padding slots carry the last real token's timestamp, or the query time when given (the
        last real token's next time either way; a full-width sample's last slot gets it from
        ``query_timestamps`` directly).
        """
        lengths = offsets[1:] - offsets[:-1]
        slot = torch.arange(width, device=x.device)
        padded, dest = to_padded(x, offsets, width)
        pad = width - lengths
        targets = pad if num_targets is None else num_targets + pad
        ts = None
        if timestamps is not None:
            last = (offsets[1:] - 1).clamp(min=0).view(-1, 1)
            src = torch.minimum(offsets[:-1].view(-1, 1) + slot.view(1, -1), last)
            ts = timestamps[src]
            if query_timestamps is not None:
                real = slot.view(1, -1) < lengths.view(-1, 1)
                ts = torch.where(real, ts, query_timestamps.view(-1, 1))
            ts = ts.reshape(-1)
        padded_offsets = torch.arange(lengths.numel() + 1, device=x.device) * width
        return padded, dest, padded_offsets, targets, ts


__all__ = ["HSTUBlock", "SequenceBlock", "to_padded"]
