"""Ranking model: tokens -> HSTU block -> MLP head on candidate tokens -> BCE or CE.

Legend: B samples, C[b] candidates, S = sum(C) candidate rows of this rank, W last width of
the head (num_tasks for BCE, the class count for CE), D hidden width.

Loss:
- W == num_tasks: task t's label of a candidate is bit t of its action value; the loss is
  the sum over tasks of the mean binary cross-entropy over candidates.
- otherwise: cross-entropy over W classes, the action value being the class index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from hstu.data.batch import Batch
from hstu.model.encode import DenseModel
from hstu.model.hstu_block import HSTUBlock
from hstu.model.loss_scale import PendingScale, global_mean_scale
from hstu.model.tensor_parallel import take_own_rows
from hstu.model.tokens import TokenBuilder


class MLP(nn.Module):
    """Linear layers of widths ``arch`` with an activation between them (not after the last)."""

    def __init__(
        self, in_features: int, arch: list[int], activation: str = "relu", bias: bool = True
    ) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        assert activation in acts, activation  # RankingArgs.prediction_head_act_type checks
        layers: list[nn.Module] = []
        width = in_features
        for i, out in enumerate(arch):
            layers.append(nn.Linear(width, out, bias=bias))
            if i < len(arch) - 1:
                layers.append(acts[activation]())
            width = out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def decode_task_labels(labels: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """int64 [S] action values -> float [S, num_tasks]: bit t of each value."""
    bits = torch.arange(num_tasks, device=labels.device)
    return ((labels.unsqueeze(1) >> bits) & 1).float()


def ranking_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_tasks: int,
    scale: torch.Tensor | None = None,
    check_labels: bool = True,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [S, W], labels int64 [S] -> scalar (see the module docstring).

    ``scale`` None: the mean over the S candidates; otherwise the sum over them times
    ``scale`` (:func:`hstu.model.loss_scale.global_mean_scale`). ``check_labels`` checks
    class labels against W (a host sync: training relies on the build-time check of
    :func:`check_ranking_head` instead). ``weights`` float [S] (with ``scale``): each
    candidate's weight in the sum (0: padding, not trained).
    """
    if labels.numel() == 0:
        return logits.sum() * 0.0
    if logits.shape[1] == num_tasks:
        targets = decode_task_labels(labels, num_tasks)
        per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)
    else:
        if check_labels and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
            raise ValueError(
                f"cross-entropy labels must lie in [0, {logits.shape[1]}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        per = F.cross_entropy(logits, labels, reduction="none")
    if scale is None:
        return per.mean()
    if weights is not None:
        per = per * weights
    return per.sum() * scale


class RankingModel(DenseModel):
    """The dense part: forward(batch, embeddings) -> (loss, (logits [S, W], labels [S])) for
    this rank's candidates (``embeddings``: the sparse module's output for the batch).

    In training the loss is this rank's share of the global-batch mean
    (:mod:`hstu.model.loss_scale`); in evaluation the mean over its candidates.

    Args:
        token_builder: projections and token layout.
        block: the HSTU block (tensor-parallel over ``tp_group`` if any).
        head: MLP on candidate token states, D -> W.
        num_tasks: BCE tasks (see module docstring).
        history_loss_weight: in training, add this times the same loss computed on every
            history item's token against its own action (0: candidates only).
        max_item_seqlen: longest H + C of the dataset (0: take the gathered batch's).
        tp_group: tensor-parallel group whose samples the dense part gathers.
    """

    def __init__(
        self,
        token_builder: TokenBuilder,
        block: HSTUBlock,
        head: nn.Module,
        *,
        num_tasks: int,
        history_loss_weight: float = 0.0,
        max_item_seqlen: int = 0,
        tp_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(token_builder, block, max_item_seqlen, tp_group)
        self.head = head
        self.num_tasks = num_tasks
        self.history_loss_weight = history_loss_weight

    def forward(
        self, batch: Batch, embeddings: dict
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if batch.labels is None:
            raise ValueError("a ranking batch needs labels (the candidates' action values)")
        # this rank's candidate count, summed over the world while the block runs; padding
        # samples of online training (sample_mask False in training) weigh 0
        weights = None
        count = batch.num_candidates.sum()
        if self.training and batch.sample_mask is not None:
            keep = batch.sample_mask.to(batch.num_candidates.device)
            weights = torch.repeat_interleave(keep, batch.num_candidates).float()
            count = (batch.num_candidates * keep).sum()
        pending = PendingScale(count, self.training)
        _, inputs, layout, tokens, states = self._states(batch, embeddings)
        logits = self.head(states[tokens.candidate_rows].float())  # [S_all, W]
        logits = take_own_rows(logits, layout.candidates, self.tp_group)
        scale = pending.wait()
        loss = ranking_loss(
            logits, batch.labels, self.num_tasks, scale, check_labels=not self.training,
            weights=None if weights is None else weights.to(logits.device),
        )
        if self.training and self.history_loss_weight > 0:
            history = self.history_loss(batch, inputs, layout, tokens, states)
            loss = loss + self.history_loss_weight * history
        return loss, (logits.detach(), batch.labels)

    def history_loss(self, batch: Batch, inputs, layout, tokens, states) -> torch.Tensor:
        """The same head and loss on every history item token against that item's own action.

        History item j's token sees items 0..j and actions 0..j-1 (causal; its action token
        comes after it), never action j, so this is a next-action prediction like the
        candidates', on sum(H) labels instead of sum(C).
        """
        if batch.action_feature_name is None:
            raise ValueError(
                "RankingArgs.history_loss_weight > 0 needs action tokens "
                "(DatasetArgs.action_tokens = True)"
            )
        # [sum(H)_all, W]
        logits = self.head(states.index_select(0, tokens.history_query_rows).float())
        logits = take_own_rows(logits, layout.history, self.tp_group)
        labels = batch.features[batch.action_feature_name].values().to(logits.device)
        # a fill on the device, not a copy from the host (a blocking copy on CUDA)
        count = torch.full((), labels.numel(), dtype=torch.int64, device=logits.device)
        scale = global_mean_scale(count, self.training)
        return ranking_loss(logits, labels, self.num_tasks, scale, check_labels=not self.training)


__all__ = ["MLP", "RankingModel", "decode_task_labels", "ranking_loss"]
