"""Shared by the ranking and retrieval models: batch -> looked-up inputs -> tokens -> HSTU states
(:func:`encode_batch`), and :class:`DenseModel`, what both dense parts hold to run it."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import ProcessGroup

from hstu.data.batch import Batch
from hstu.embeddings.collection import apply_misses
from hstu.model.tokens import (
    SequenceInputs,
    TokenBuilder,
    gather_sequence_inputs,
    max_token_seqlen,
    sequence_inputs,
)
from hstu.sync_audit import allowed_sync


def encode_batch(
    batch: Batch,
    embeddings: dict,
    token_builder: TokenBuilder,
    block: nn.Module,
    max_item_seqlen: int,
    tp_group: ProcessGroup | None,
):
    """``embeddings``: the sparse module's output for ``batch.features``.

    Returns (own inputs, TP-gathered inputs, their GroupLayout, tokens, states [T_all, D]).

    ``max_item_seqlen`` (0: the batch's) sizes the kernel's max sequence length so that
    shapes stay stable across batches.
    """
    embeddings = apply_misses(embeddings, batch.lookup_misses)
    own: SequenceInputs = sequence_inputs(batch, embeddings)
    inputs, layout = gather_sequence_inputs(own, tp_group, batch.tp_sizes)
    tokens = token_builder(inputs)
    max_items = max_item_seqlen or batch.max_seqlen
    if not max_items:
        with allowed_sync("a batch without max_seqlen (built by hand): read from its lengths"):
            max_items = int(inputs.item_lengths.max())
    max_seqlen = max_token_seqlen(
        max_items,
        len(token_builder.contextual_feature_names),
        inputs.action_values is not None,
    )
    truncated = None
    if getattr(block, "attn_truncation_layers", 0):  # its slice sized on the host
        truncated = inputs.sizes.truncated_tokens(
            block.attn_truncation_len, len(token_builder.contextual_feature_names),
            2 if inputs.action_values is not None else 1,
        )
    states: torch.Tensor = block(
        tokens.values,
        tokens.offsets,
        max_seqlen,
        tokens.num_contextual,
        tokens.num_targets,
        tokens.timestamps,
        query_timestamps=tokens.query_timestamps,
        truncated_sizes=truncated,
    )
    return own, inputs, layout, tokens, states


class DenseModel(nn.Module):
    """The ranking and retrieval dense parts' shared half: the token builder, the block, and
    :meth:`_states` (:func:`encode_batch` with them; ``max_item_seqlen``, ``tp_group``: its)."""

    def __init__(self, token_builder: TokenBuilder, block: nn.Module, max_item_seqlen: int,
                 tp_group: ProcessGroup | None) -> None:
        super().__init__()
        self.token_builder = token_builder
        self.block = block
        self.max_item_seqlen = max_item_seqlen
        self.tp_group = tp_group

    def _states(self, batch: Batch, embeddings: dict):
        return encode_batch(
            batch, embeddings, self.token_builder, self.block, self.max_item_seqlen, self.tp_group
        )
