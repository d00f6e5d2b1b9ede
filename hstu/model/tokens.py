"""From looked-up embeddings to the jagged token sequence the HSTU block reads.

Legend: B samples, H[b] history items, C[b] candidates, X contextual features (one value each),
A = 2 with an action feature (item and action tokens interleaved) else 1, D hidden width,
n[b] = X + A*H[b] + C[b] tokens of sample b, T = sum(n).

Token layout of sample b (docs/model.md "Token layout"):

    [ctx_0 .. ctx_{X-1}, i_0, a_0, i_1, a_1, ..., i_{H-1}, a_{H-1}, c_0, .., c_{C-1}]

Candidates are item tokens only: their actions are the ranking labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from hstu.model.tensor_parallel import RowLayout, all_gather_rows, exchange_sizes
from hstu.ops.jagged import index_within, lengths_to_offsets, segment_ids

if TYPE_CHECKING:  # torchrec: the serving model builds on this module with torch alone
    from hstu.data.batch import Batch, BatchSizes


@dataclass
class SequenceInputs:
    """Looked-up embeddings of one batch, before any dense computation.

    item_values [sum(H+C), D_item]; item_lengths [B] = H + C; action_values [sum(H), D_act]
    or None; contextual: feature -> [B, D_ctx]; num_candidates [B]; timestamps [sum(H+C)] or
    None; query_timestamps [B] or None (Batch.query_timestamps); item_ids [sum(H+C)]; sizes:
    their host-side counts (no host sync to size tensors).
    """

    item_values: torch.Tensor
    item_lengths: torch.Tensor
    item_ids: torch.Tensor
    num_candidates: torch.Tensor
    sizes: BatchSizes
    action_values: torch.Tensor | None = None
    contextual: dict[str, torch.Tensor] | None = None
    timestamps: torch.Tensor | None = None
    query_timestamps: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.item_lengths.numel()

    @property
    def history_lengths(self) -> torch.Tensor:
        return self.item_lengths - self.num_candidates


def sequence_inputs(batch: Batch, embeddings: dict) -> SequenceInputs:
    """Pairs a Batch with the embedding module's output (feature -> JaggedTensor).

    The layout checks run on the device (``torch._assert_async``: no host sync on CUDA,
    where a failure is a device-side assert); the loader builds batches that pass them.
    """
    item = embeddings[batch.item_feature_name]
    lengths = item.lengths()
    num_candidates = (
        batch.num_candidates if batch.num_candidates is not None else torch.zeros_like(lengths)
    )
    action_values = None
    if batch.action_feature_name is not None:
        action = embeddings[batch.action_feature_name]
        torch._assert_async(
            (action.lengths() == lengths - num_candidates).all(),
            "the action feature must hold one value per history item",
        )
        action_values = action.values()
    contextual = {}
    for name in batch.contextual_feature_names:
        jt = embeddings[name]
        torch._assert_async(
            (jt.lengths() == 1).all(),
            f"contextual feature {name!r} must hold exactly one value per sample",
        )
        contextual[name] = jt.values()
    return SequenceInputs(
        item_values=item.values(),
        item_lengths=lengths,
        item_ids=batch.features[batch.item_feature_name].values(),
        num_candidates=num_candidates,
        sizes=batch.require_sizes(),
        action_values=action_values,
        contextual=contextual,
        timestamps=batch.timestamps,
        query_timestamps=batch.query_timestamps,
    )


@dataclass(frozen=True)
class GroupLayout:
    """Rows each TP rank contributed to the gathered inputs, per kind of row (rank order)."""

    samples: RowLayout
    items: RowLayout
    history: RowLayout
    candidates: RowLayout

    @staticmethod
    def of(sizes: tuple[BatchSizes, ...], rank: int) -> GroupLayout:
        def rows(count) -> RowLayout:
            return RowLayout(tuple(count(s) for s in sizes), rank)

        return GroupLayout(
            samples=rows(lambda s: s.num_samples),
            items=rows(lambda s: s.num_items),
            history=rows(lambda s: s.num_history_items),
            candidates=rows(lambda s: s.num_candidates),
        )


def gather_sequence_inputs(
    inputs: SequenceInputs, group: ProcessGroup | None,
    group_sizes: tuple[BatchSizes, ...] | None = None,
) -> tuple[SequenceInputs, GroupLayout]:
    """All-gathers the TP group's samples (rank order); returns them and where each rank's
    rows sit. ``group_sizes``: every rank's :class:`BatchSizes` (``Batch.tp_sizes``, from
    the loader); without them they are exchanged first (a host read of the device)."""
    from hstu.data.batch import BatchSizes

    if group is None:
        return inputs, GroupLayout.of((inputs.sizes,), 0)
    if group_sizes is None:
        group_sizes = exchange_sizes(inputs.sizes, group, inputs.item_lengths.device)
    layout = GroupLayout.of(group_sizes, dist.get_rank(group))
    if group_sizes[layout.samples.rank] != inputs.sizes:
        raise ValueError(
            f"Batch.tp_sizes {group_sizes[layout.samples.rank]} does not describe this "
            f"rank's batch {inputs.sizes}"
        )

    def gather(x: torch.Tensor | None, rows: RowLayout) -> torch.Tensor | None:
        return None if x is None else all_gather_rows(x, group, rows)[0]

    gathered = SequenceInputs(
        item_values=gather(inputs.item_values, layout.items),
        item_lengths=gather(inputs.item_lengths, layout.samples),
        item_ids=gather(inputs.item_ids, layout.items),
        num_candidates=gather(inputs.num_candidates, layout.samples),
        sizes=BatchSizes.total(group_sizes),
        action_values=gather(inputs.action_values, layout.history),
        contextual={k: gather(v, layout.samples) for k, v in (inputs.contextual or {}).items()},
        timestamps=gather(inputs.timestamps, layout.items),
        query_timestamps=gather(inputs.query_timestamps, layout.samples),
    )
    return gathered, layout


@dataclass
class Tokens:
    """The jagged token sequence and where things sit in it.

    values [T, D]; offsets [B+1]; num_contextual [B]; num_targets [B] (= C); timestamps [T] or
    None; candidate_rows [sum(C)] (aligned with the candidates in the item feature);
    history_query_rows [sum(H)]: for history item j, its own item token, aligned with the
    history items. Its state has seen items 0..j (and the actions of 0..j-1), never item j+1:
    the retrieval query for item j+1. Not the action token after it: that token holds no item
    in its residual stream and must pull item j through attention, which made retrieval
    barely learn (see hstu.model.retrieval). query_timestamps [B] or None: each sample's query
    time, the next time of its last token in the relative attention bias (only with
    ``TokenBuilder(query_time=True)``).
    """

    values: torch.Tensor
    offsets: torch.Tensor
    num_contextual: torch.Tensor
    num_targets: torch.Tensor
    timestamps: torch.Tensor | None
    candidate_rows: torch.Tensor
    history_query_rows: torch.Tensor
    query_timestamps: torch.Tensor | None = None


class TokenBuilder(nn.Module):
    """Projects each feature to D where its dim differs, and interleaves the tokens.

    Args:
        hidden_size: D.
        item_feature_name, action_feature_name, contextual_feature_names: feature names.
        feature_dims: embedding dim of each of those features.
        dtype: dtype of the projections.
        query_time: pass each sample's query time (``SequenceInputs.query_timestamps``, which
            must be there) on as the next time of its last token (``NetworkArgs.rab_query_time``;
            item tokens only: with actions the last token is not the retrieval query).
    """

    def __init__(
        self,
        hidden_size: int,
        item_feature_name: str,
        action_feature_name: str | None,
        contextual_feature_names: list[str],
        feature_dims: dict[str, int],
        dtype: torch.dtype = torch.float32,
        *,
        query_time: bool = False,
    ) -> None:
        super().__init__()
        # refused by hstu.checks.check_rab_query_time: with actions the last token is no query
        assert not (query_time and action_feature_name is not None)
        self.query_time = query_time
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
        # (a ModuleDict has no .get)
        return self.projections[name](values) if name in self.projections else values

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

        # item j of sample b sits at row item_starts[b] + j of the item feature; its history
        # items and its candidates are listed here by row (ascending), sized from the host
        sizes = inputs.sizes
        num_items = inputs.item_values.shape[0]
        item_starts = lengths_to_offsets(inputs.item_lengths)[:-1]
        seg = segment_ids(inputs.item_lengths, num_items)
        idx = index_within(inputs.item_lengths, num_items)
        item_dest = starts[seg] + token_slots(idx, hist[seg], num_ctx, mult)
        hist_seg = segment_ids(hist, sizes.num_history_items)
        hist_rows = item_starts[hist_seg] + index_within(hist, sizes.num_history_items)
        cand_seg = segment_ids(cand, sizes.num_candidates)
        cand_rows = (
            item_starts[cand_seg] + hist[cand_seg] + index_within(cand, sizes.num_candidates)
        )
        history_dest = item_dest.index_select(0, hist_rows)
        item_tokens = self.project(self.item_feature_name, inputs.item_values)
        sources.append(item_tokens)
        dests.append(item_dest)
        if has_action:
            sources.append(self.project(self.action_feature_name, inputs.action_values))
            dests.append(history_dest + 1)

        all_dest = torch.cat(dests)
        num_tokens = all_dest.shape[0]
        values = place(torch.cat([s.to(item_tokens.dtype) for s in sources]), all_dest, num_tokens)

        timestamps = None
        if inputs.timestamps is not None:
            ts = inputs.timestamps
            if num_items > 0:
                # each sample's first item's timestamp (0 for a sample without items)
                first = ts.index_select(0, item_starts.clamp(max=num_items - 1))
                first_ts = torch.where(inputs.item_lengths > 0, first, torch.zeros_like(first))
            else:
                first_ts = torch.zeros(bsz, dtype=ts.dtype, device=device)
            ts_parts = [first_ts for _ in range(num_ctx)] + [ts]
            if has_action:
                ts_parts.append(ts.index_select(0, hist_rows))
            timestamps = place(torch.cat(ts_parts), all_dest, num_tokens)

        query_timestamps = None
        if self.query_time:
            if inputs.query_timestamps is None:
                raise ValueError(
                    "NetworkArgs.rab_query_time: the batch carries no query_timestamps "
                    "(hstu.data.loader.SequenceLoader.query_times)"
                )
            query_timestamps = inputs.query_timestamps
        return Tokens(
            values=values,
            offsets=offsets,
            num_contextual=torch.full((bsz,), num_ctx, dtype=torch.int64, device=device),
            num_targets=cand.to(torch.int64),
            timestamps=timestamps,
            candidate_rows=item_dest.index_select(0, cand_rows),
            history_query_rows=history_dest,
            query_timestamps=query_timestamps,
        )


def token_slots(
    item: torch.Tensor, history: torch.Tensor, num_contextual: int, mult: int
) -> torch.Tensor:
    """Token slot, inside its sample, of item ``item`` of a sample of ``history`` (H) history
    items (any broadcastable shapes): X + A*j for history item j (its action token, if any,
    is the next slot), X + A*H + c for candidate c = j - H (module docstring)."""
    return num_contextual + torch.where(
        item < history, mult * item, mult * history + (item - history)
    )


def place(values: torch.Tensor, dest: torch.Tensor, size: int) -> torch.Tensor:
    """Rows into a token layout: values [..., S, *F] to slots ``dest`` [..., S] of a
    zero-filled [..., size, *F] (the jagged layout: dest [S]; the padded one: [B, S])."""
    dim = dest.dim() - 1
    index = dest.view(*dest.shape, *([1] * (values.dim() - dest.dim()))).expand_as(values)
    out = values.new_zeros(*values.shape[:dim], size, *values.shape[dim + 1 :])
    return out.scatter(dim, index, values)


def max_token_seqlen(max_item_seqlen: int, num_contextual: int, has_action: bool) -> int:
    """Longest token sequence for samples of at most ``max_item_seqlen`` items (H + C)."""
    return num_contextual + (2 if has_action else 1) * max_item_seqlen


__all__ = [
    "GroupLayout",
    "SequenceInputs",
    "TokenBuilder",
    "Tokens",
    "gather_sequence_inputs",
    "max_token_seqlen",
    "place",
    "sequence_inputs",
    "token_slots",
]
