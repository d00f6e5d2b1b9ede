"""Small batches and a plain embedding module for the model tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from hstu.data.batch import Batch
from hstu.data.negatives import NegativeSampler, attach_negatives
from hstu.model.builder import ModelDataInfo


class TinyEmbeddings(nn.Module):
    """feature -> nn.Embedding; maps a KeyedJaggedTensor to dict[feature, JaggedTensor]."""

    def __init__(self, dims: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(rows, dim) for name, (rows, dim) in dims.items()}
        )

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        out = {}
        for name in features.keys():  # noqa: SIM118 (a KeyedJaggedTensor, not a dict)
            jt = features[name]
            # the retrieval negatives key is looked up by its item table (hstu.data.negatives)
            table = self.tables[name.removesuffix("__negatives")]
            out[name] = JaggedTensor(values=table(jt.values()), lengths=jt.lengths())
        return out


def ranking_tables(
    num_items: int, num_actions: int, num_users: int, dim: int, user_dim: int, seed: int
) -> tuple[ModelDataInfo, TinyEmbeddings]:
    """A ranking model's data (items and actions of ``dim``, one contextual 'user' feature of
    ``user_dim``, histories up to 8) and tables for them drawn after ``manual_seed(seed)``."""
    data = ModelDataInfo(
        num_items=num_items,
        item_feature_name="item",
        max_item_seqlen=8,
        action_feature_name="action",
        contextual_feature_names=["user"],
        feature_dims={"item": dim, "action": dim, "user": user_dim},
    )
    torch.manual_seed(seed)
    tables = {"item": (num_items, dim), "action": (num_actions, dim), "user": (num_users, user_dim)}
    return data, TinyEmbeddings(tables)


def make_batch(
    history: list[list[int]],
    candidates: list[list[int]] | None = None,
    actions: list[list[int]] | None = None,
    contextual: dict[str, list[int]] | None = None,
    labels: list[int] | None = None,
    timestamps: list[list[int]] | None = None,
    max_seqlen: int = 0,
    negatives: NegativeSampler | None = None,
    training: bool = True,
) -> Batch:
    """One Batch from python lists (history/candidates item ids per sample); with
    ``negatives``, the retrieval negatives key drawn for samples 0..B-1 of epoch 0."""
    bsz = len(history)
    candidates = candidates or [[] for _ in range(bsz)]
    items = [h + c for h, c in zip(history, candidates)]
    keys, values, lengths = ["item"], [v for s in items for v in s], [len(s) for s in items]
    if actions is not None:
        keys.append("action")
        values += [v for s in actions for v in s]
        lengths += [len(s) for s in actions]
    for name, vals in (contextual or {}).items():
        keys.append(name)
        values += vals
        lengths += [1] * bsz
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )
    if timestamps is None:
        timestamps = [[100 * (j + 1) for j in range(len(s))] for s in items]
    batch = Batch(
        features=kjt,
        batch_size=bsz,
        item_feature_name="item",
        contextual_feature_names=list((contextual or {}).keys()),
        action_feature_name="action" if actions is not None else None,
        num_candidates=torch.tensor([len(c) for c in candidates], dtype=torch.int64),
        timestamps=torch.tensor([t for s in timestamps for t in s], dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64) if labels is not None else None,
        max_seqlen=max_seqlen or max(len(s) for s in items),
    )
    if negatives is not None:
        batch = attach_negatives(batch, negatives, np.arange(bsz), 0, training)
    return batch


def sampler(mode: str = "uniform", num_negatives: int = 5, num_items: int = 30,
            min_item_id: int = 1, seed: int = 0) -> NegativeSampler:
    return NegativeSampler(mode, num_negatives, min_item_id, num_items, "item", seed)


def popularity_hr10(train: list[list[int]], history: list[list[int]], targets: list[int],
                    num_items: int) -> float:
    """HR@10 of ranking every item by its count in ``train`` (the popularity floor), each
    user's history and the padding id 0 excluded, for the held-out ``targets``."""
    from hstu.model.metrics import ranks_from_scores, retrieval_metrics

    counts = torch.bincount(torch.tensor([i for u in train for i in u]), minlength=num_items)
    scores = counts.double().expand(len(history), -1).clone()
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    excluded[:, 0] = True
    for b, h in enumerate(history):
        excluded[b, h] = True
    ranks = ranks_from_scores(scores, torch.tensor(targets), excluded)
    return float(retrieval_metrics(ranks, ["HR@10"])["HR@10"].mean())
