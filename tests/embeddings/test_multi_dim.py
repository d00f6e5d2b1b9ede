"""Tables of different dims live in one collection per dim behind one module."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.args import EmbeddingArgs
from hstu.embeddings import EmbeddingsByDim, HstuEmbeddings, build_embeddings


def test_one_dim_stays_one_collection_and_two_dims_route_by_feature():
    tables = [
        EmbeddingArgs(["item_id"], "item", 10, "model_parallel"),
        EmbeddingArgs(["action"], "action", 4, "data_parallel"),
        EmbeddingArgs(["user_id"], "user", 6, "model_parallel"),
    ]
    same = build_embeddings(tables, {"item": 8, "action": 8, "user": 8})
    assert isinstance(same, HstuEmbeddings)
    mixed = build_embeddings(tables, {"item": 8, "action": 8, "user": 4}, seed=3)
    assert isinstance(mixed, EmbeddingsByDim) and set(mixed.groups) == {"dim4", "dim8"}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "action", "user_id"],
        values=torch.tensor([1, 2, 3, 0, 1, 5, 4]),
        lengths=torch.tensor([2, 1, 1, 1, 1, 1]),
    )
    out = mixed(kjt)
    assert out["item_id"].values().shape == (3, 8)
    assert out["action"].values().shape == (2, 8)
    assert out["user_id"].values().shape == (2, 4)
    user_table = mixed.groups["dim4"].ec.embeddings["user"].weight
    assert torch.equal(out["user_id"].values(), user_table[torch.tensor([5, 4])])
    item_table = mixed.groups["dim8"].ec.embeddings["item"].weight
    assert torch.equal(out["item_id"].values(), item_table[torch.tensor([1, 2, 3])])
    assert torch.equal(out["item_id"].lengths(), torch.tensor([2, 1]))
