"""The non-sequential ranking baseline sees the user and the candidate, never the history."""

from __future__ import annotations

import torch
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import Batch
from hstu.model.baseline import NonSequentialRanking
from hstu.model.model import GenerativeRecommender


def _model() -> GenerativeRecommender:
    torch.manual_seed(0)
    ec = EmbeddingCollection(tables=[
        EmbeddingConfig(name="item", embedding_dim=4, num_embeddings=20, feature_names=["item_id"]),
        EmbeddingConfig(name="user", embedding_dim=4, num_embeddings=5, feature_names=["user_id"]),
    ])
    return GenerativeRecommender(ec, NonSequentialRanking("item_id", ["user_id"], 8, [8, 1], num_tasks=1))


def _batch(items: list[list[int]], users: list[int], cands: list[int], labels: list[int]) -> Batch:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "user_id"],
        values=torch.tensor([i for seq in items for i in seq] + users),
        lengths=torch.tensor([len(s) for s in items] + [1] * len(users)),
    )
    return Batch(kjt, len(items), "item_id", ["user_id"], num_candidates=torch.tensor(cands),
                 labels=torch.tensor(labels))


def test_logits_ignore_history_and_follow_candidate_and_user():
    model = _model()
    base = _batch([[1, 2, 3, 10, 11], [4, 12]], [1, 2], [2, 1], [1, 0, 1])
    other_history = _batch([[7, 8, 10, 11], [9, 9, 9, 12]], [1, 2], [2, 1], [1, 0, 1])
    loss, (logits, labels) = model(base)
    _, (logits_h, _) = model(other_history)
    assert logits.shape == (3, 1) and torch.equal(labels, torch.tensor([1, 0, 1]))
    assert torch.allclose(logits, logits_h)
    other_user = _batch([[1, 2, 3, 10, 11], [4, 12]], [3, 2], [2, 1], [1, 0, 1])
    _, (logits_u, _) = model(other_user)
    assert not torch.allclose(logits_u[:2], logits[:2]) and torch.allclose(logits_u[2], logits[2])
    other_cand = _batch([[1, 2, 3, 10, 13], [4, 12]], [1, 2], [2, 1], [1, 0, 1])
    _, (logits_c, _) = model(other_cand)
    assert torch.allclose(logits_c[0], logits[0]) and not torch.allclose(logits_c[1], logits[1])
    assert torch.isfinite(loss) and loss.requires_grad
