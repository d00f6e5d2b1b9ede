"""From looked-up embeddings to the jagged token sequence the HSTU block reads.

Legend: B samples, H[b] history items, C[b] candidates, X contextual features (one value each),
A = 2 with an action feature (item and action tokens interleaved) else 1, D hidden width,
n[b] = X + A*H[b] + C[b] tokens of sample b, T = sum(n).

Token layout of sample b (DESIGN.md "Model"):

    [ctx_0 .. ctx_{X-1}, i_0, a_0, i_1, a_1, ..., i_{H-1}, a_{H-1}, c_0, .., c_{C-1}]

Candidates are item tokens only: their actions are the ranking labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hstu.data.batch import Batch
from hstu.model.jagged import index_within, lengths_to_offsets, segment_ids
from hstu.model.tensor_parallel import RowLayout, all_gather_rows


@dataclass
class SequenceInputs:
    """Looked-up embeddings of one batch, before any dense computation.

    item_values [sum(H+C), D_item]; item_lengths [B] = H + C; action_values [sum(H), D_act]
    or None; contextual: feature -> [B, D_ctx]; num_candidates [B]; timestamps [sum(H+C)] or
    None; item_ids [sum(H+C)].
    """

    item_values: torch.Tensor
    item_lengths: torch.Tensor
    item_ids: torch.Tensor
    num_candidates: torch.Tensor
    action_values: torch.Tensor | None = None
    contextual: dict[str, torch.Tensor] | None = None
    timestamps: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.item_lengths.numel()

    @property
    def history_lengths(self) -> torch.Tensor:
        return self.item_lengths - self.num_candidates


def sequence_inputs(batch: Batch, embeddings: dict) -> SequenceInputs:
    """Pairs a Batch with the embedding module's output (feature -> JaggedTensor)."""
    item = embeddings[batch.item_feature_name]
    lengths = item.lengths()
    num_candidates = (
        batch.num_candidates if batch.num_candidates is not None else torch.zeros_like(lengths)
    )
    action_values = None
    if batch.action_feature_name is not None:
        action = embeddings[batch.action_feature_name]
        if not torch.equal(action.lengths(), lengths - num_candidates):
            raise ValueError("the action feature must hold one value per history item")
        action_values = action.values()
    contextual = {}
    for name in batch.contextual_feature_names:
        jt = embeddings[name]
        if not bool((jt.lengths() == 1).all()):
            raise ValueError(f"contextual feature {name!r} must hold exactly one value per sample")
        contextual[name] = jt.values()
    return SequenceInputs(
        item_values=item.values(),
        item_lengths=lengths,
        item_ids=batch.features[batch.item_feature_name].values(),
        num_candidates=num_candidates,
        action_values=action_values,
        contextual=contextual,
        timestamps=batch.timestamps,
    )


def gather_sequence_inputs(
    inputs: SequenceInputs, group: ProcessGroup | None
) -> tuple[SequenceInputs, RowLayout]:
    """All-gathers the TP group's samples (rank order); returns them and the sample layout."""
    if group is None:
        return inputs, RowLayout((inputs.batch_size,), 0)

    def gather(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else all_gather_rows(x, group)[0]

    lengths, sample_layout = all_gather_rows(inputs.item_lengths, group)
    gathered = SequenceInputs(
        item_values=gather(inputs.item_values),
        item_lengths=lengths,
        item_ids=gather(inputs.item_ids),
        num_candidates=gather(inputs.num_candidates),
        action_values=gather(inputs.action_values),
        contextual={k: gather(v) for k, v in (inputs.contextual or {}).items()},
        timestamps=gather(inputs.timestamps),
    )
    return gathered, sample_layout


def rows_layout(per_sample: torch.Tensor, sample_layout: RowLayout) -> RowLayout:
    """Layout of rows counted per sample (e.g. candidates) given the gathered sample layout."""
    counts = tuple(int(c.sum()) for c in per_sample.split(list(sample_layout.counts)))
    return RowLayout(counts, sample_layout.rank)


@dataclass
class Tokens:
    """The jagged token sequence and where things sit in it.

    values [T, D]; offsets [B+1]; num_contextual [B]; num_targets [B] (= C); timestamps [T] or
    None; candidate_rows [sum(C)] (aligned with the candidates in the item feature);
    history_query_rows [sum(H)]: for history item j, its own item token, aligned with the
    history items. Its state has seen items 0..j (and the actions of 0..j-1), never item j+1:
    the retrieval query for item j+1. Not the action token after it: that token holds no item
    in its residual stream and must pull item j through attention, which made retrieval
    barely learn (see hstu.model.retrieval).
    """

    values: torch.Tensor
    offsets: torch.Tensor
    num_contextual: torch.Tensor
    num_targets: torch.Tensor
    timestamps: torch.Tensor | None
    candidate_rows: torch.Tensor
    history_query_rows: torch.Tensor


class TokenBuilder(nn.Module):
    """Projects each feature to D where its dim differs, and interleaves the tokens.

    Args:
        hidden_size: D.
        item_feature_name, action_feature_name, contextual_feature_names: feature names.
        feature_dims: embedding dim of each of those features.
        dtype: dtype of the projections.
    """

    def __init__(
        self,
        hidden_size: int,
        item_feature_name: str,
        action_feature_name: str | None,
        contextual_feature_names: list[str],
        feature_dims: dict[str, int],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.item_feature_name = item_feature_name
        self.action_feature_name = action_feature_name
        self.contextual_feature_names = list(contextual_feature_names)
        names = [item_feature_name, *self.contextual_feature_names]
        if action_feature_name is not None:
            names.append(action_feature_name)
        self.projections = nn.ModuleDict(
            {
                name: nn.Linear(feature_dims[name], hidden_size, bias=False, dtype=dtype)
                for name in names
                if feature_dims.get(name, hidden_size) != hidden_size
            }
        )

    def project(self, name: str, values: torch.Tensor) -> torch.Tensor:
        proj = self.projections[name] if name in self.projections else None  # noqa: SIM401 (ModuleDict has no .get)
        return proj(values) if proj is not None else values

    def forward(self, inputs: SequenceInputs) -> Tokens:
        device = inputs.item_lengths.device
        bsz = inputs.batch_size
        hist = inputs.history_lengths
        cand = inputs.num_candidates
        has_action = inputs.action_values is not None
        mult = 2 if has_action else 1
        num_ctx = len(self.contextual_feature_names)
        lengths = num_ctx + mult * hist + cand
        offsets = lengths_to_offsets(lengths)
        starts = offsets[:-1]

        sources: list[torch.Tensor] = []
        dests: list[torch.Tensor] = []
        for k, name in enumerate(self.contextual_feature_names):
            sources.append(self.project(name, inputs.contextual[name]))
            dests.append(starts + k)

        seg = segment_ids(inputs.item_lengths)
        idx = index_within(inputs.item_lengths)
        hist_of = hist[seg]
        is_hist = idx < hist_of
        item_dest = (
            starts[seg]
            + num_ctx
            + torch.where(is_hist, mult * idx, mult * hist_of + (idx - hist_of))
        )
        item_tokens = self.project(self.item_feature_name, inputs.item_values)
        sources.append(item_tokens)
        dests.append(item_dest)
        if has_action:
            sources.append(self.project(self.action_feature_name, inputs.action_values))
            dests.append(item_dest[is_hist] + 1)

        all_dest = torch.cat(dests)
        order = torch.argsort(all_dest)
        values = torch.cat([s.to(item_tokens.dtype) for s in sources])[order]

        timestamps = None
        if inputs.timestamps is not None:
            first_ts = torch.zeros(bsz, dtype=inputs.timestamps.dtype, device=device)
            has_items = inputs.item_lengths > 0
            item_starts = lengths_to_offsets(inputs.item_lengths)[:-1]
            first_ts[has_items] = inputs.timestamps[item_starts[has_items]]
            ts_parts = [first_ts for _ in range(num_ctx)] + [inputs.timestamps]
            if has_action:
                ts_parts.append(inputs.timestamps[is_hist])
            timestamps = torch.cat(ts_parts)[order]

        return Tokens(
            values=values,
            offsets=offsets,
            num_contextual=torch.full((bsz,), num_ctx, dtype=torch.int64, device=device),
            num_targets=cand.to(torch.int64),
            timestamps=timestamps,
            candidate_rows=item_dest[~is_hist],
            history_query_rows=item_dest[is_hist],
        )


def max_token_seqlen(max_item_seqlen: int, num_contextual: int, has_action: bool) -> int:
    """Longest token sequence for samples of at most ``max_item_seqlen`` items (H + C)."""
    return num_contextual + (2 if has_action else 1) * max_item_seqlen


__all__ = [
    "SequenceInputs",
    "TokenBuilder",
    "Tokens",
    "gather_sequence_inputs",
    "max_token_seqlen",
    "rows_layout",
    "sequence_inputs",
]
