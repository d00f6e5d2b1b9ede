"""A non-sequential ranking baseline: an MLP over the user's contextual embeddings and the
candidate item's embedding. No history, no attention. Same batches, loss and outputs as
:class:`hstu.model.ranking.RankingModel`, so the trainer runs and evaluates it unchanged;
it tells how much the sequence (HSTU) adds over who-the-user-is plus what-the-item-is.

Legend: B samples, C[b] candidates, S = sum(C), X contextual features, D_* dims, W head width.
"""

from __future__ import annotations

import torch
from torch import nn

from hstu.data.batch import Batch
from hstu.embeddings.collection import apply_misses
from hstu.model.loss_scale import global_mean_scale
from hstu.model.ranking import MLP, ranking_loss
from hstu.ops.dropout import Dropout
from hstu.ops.jagged import index_within, segment_ids


class NonSequentialRanking(nn.Module):
    """The dense part: forward(batch, embeddings) -> (loss, (logits [S, W], labels [S])).

    Args:
        item_feature_name: the item feature (history then candidates per sample).
        contextual_feature_names: features of one value per sample (e.g. user_id).
        input_dim: D_item + sum of the contextual dims.
        arch, activation, bias: the MLP head (last width W).
        num_tasks: as RankingArgs.num_tasks (BCE per task when W == num_tasks).
        dropout: on the concatenated input.
    """

    def __init__(
        self,
        item_feature_name: str,
        contextual_feature_names: list[str],
        input_dim: int,
        arch: list[int],
        activation: str = "relu",
        bias: bool = True,
        num_tasks: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.item_feature_name = item_feature_name
        self.contextual_feature_names = list(contextual_feature_names)
        self.dropout = Dropout(dropout)
        self.head = MLP(input_dim, list(arch), activation, bias)
        self.num_tasks = num_tasks

    def forward(
        self, batch: Batch, embeddings: dict
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if batch.labels is None or batch.num_candidates is None:
            raise ValueError("a ranking batch needs candidates and labels")
        embeddings = apply_misses(embeddings, batch.lookup_misses)
        items = embeddings[self.item_feature_name]
        lengths = items.lengths()
        ends = torch.cumsum(lengths, 0)
        num_cands = batch.num_candidates.to(lengths.device)
        # rows of the candidates: the last C[b] item rows of each sample (sum(C) from the
        # batch's host-side sizes: no host sync)
        num_rows = batch.require_sizes().num_candidates
        sample = segment_ids(num_cands, num_rows)
        first = (ends - num_cands)[sample]
        cand_rows = first + index_within(num_cands, num_rows)
        parts = [items.values()[cand_rows]]
        for name in self.contextual_feature_names:
            parts.append(embeddings[name].values()[sample])  # one value per sample
        logits = self.head(self.dropout(torch.cat(parts, dim=1).float()))
        scale = global_mean_scale(num_cands.sum(), self.training)
        loss = ranking_loss(
            logits, batch.labels, self.num_tasks, scale, check_labels=not self.training
        )
        return loss, (logits.detach(), batch.labels)


__all__ = ["NonSequentialRanking"]
