"""Tables of different dims: one :class:`HstuEmbeddings` per dim behind one module.

TorchRec's EmbeddingCollection holds tables of a single dim, so items and contextual
features with different dims (``NetworkArgs.item_embedding_dim`` and
``contextual_embedding_dim``) live in separate collections. Each is sharded on its own by
:func:`hstu.embeddings.shard_embeddings` (which finds every HstuEmbeddings in a model), and
checkpointed the same way.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from hstu.args import EmbeddingArgs
from hstu.embeddings.collection import HstuEmbeddings, build_embedding_collection


class EmbeddingsByDim(nn.Module):
    """KeyedJaggedTensor -> dict[feature, JaggedTensor], routing features by their table's dim."""

    def __init__(self, groups: dict[int, HstuEmbeddings], feature_dim: dict[str, int]) -> None:
        super().__init__()
        self.groups = nn.ModuleDict({f"dim{d}": g for d, g in sorted(groups.items())})
        self._feature_group = {f: f"dim{d}" for f, d in feature_dim.items()}

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        by_key = features.to_dict()
        routed: dict[str, dict[str, JaggedTensor]] = defaultdict(dict)
        for key, jt in by_key.items():
            if key not in self._feature_group:
                raise KeyError(f"feature {key!r} has no embedding table")
            routed[self._feature_group[key]][key] = jt
        out: dict[str, JaggedTensor] = {}
        # every group is called, in a fixed order, on every rank (sharded lookups are collective)
        for name, group in self.groups.items():
            part = routed.get(name, {})
            if not part:
                continue
            out.update(group(KeyedJaggedTensor.from_jt_dict(part)))
        return out

    def stats(self) -> dict[str, dict[str, int | float]]:
        merged: dict[str, dict[str, int | float]] = {}
        for group in self.groups.values():
            merged.update(group.stats())
        return merged


def build_embeddings(
    tables: list[EmbeddingArgs],
    embedding_dims: dict[str, int],
    device: torch.device | str = "cpu",
    seed: int = 0,
    sparse_optimizer: str = "adam",
) -> nn.Module:
    """One HstuEmbeddings when every table has the same dim, else one per dim."""
    dims = sorted({embedding_dims[t.table_name] for t in tables})
    if len(dims) <= 1:
        return build_embedding_collection(tables, embedding_dims, device, seed, sparse_optimizer)
    groups = {
        d: build_embedding_collection(
            [t for t in tables if embedding_dims[t.table_name] == d],
            embedding_dims,
            device,
            seed * 1_000_003 + d,
            sparse_optimizer,
        )
        for d in dims
    }
    feature_dim = {f: embedding_dims[t.table_name] for t in tables for f in t.feature_names}
    return EmbeddingsByDim(groups, feature_dim)


__all__ = ["EmbeddingsByDim", "build_embeddings"]
