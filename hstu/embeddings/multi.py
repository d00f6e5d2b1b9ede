"""Tables of different dims: one :class:`HstuEmbeddings` per dim behind one module.

TorchRec's EmbeddingCollection holds tables of a single dim, so items and contextual
features with different dims (``NetworkArgs.item_embedding_dim`` and
``contextual_embedding_dim``) live in separate collections. Each is sharded on its own by
:func:`hstu.embeddings.shard_embeddings` (which finds every HstuEmbeddings in a model), and
checkpointed the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from hstu.args import EmbeddingArgs
from hstu.embeddings.collection import (
    HstuEmbeddings,
    MergeLookups,
    apply_misses,
    build_embedding_collection,
)


class EmbeddingsByDim(nn.Module):
    """KeyedJaggedTensor -> dict[feature, JaggedTensor], routing features by their table's dim."""

    def __init__(self, groups: dict[int, HstuEmbeddings], feature_dim: dict[str, int]) -> None:
        super().__init__()
        self.groups = nn.ModuleDict({f"dim{d}": g for d, g in sorted(groups.items())})
        self._feature_group = {f: f"dim{d}" for f, d in feature_dim.items()}
        self.merge = MergeLookups()

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """Every group takes the whole KeyedJaggedTensor and looks up its own features (one
        call of each sharded collection per step, in a fixed order on every rank; traceable
        for TorchRec's pipelines)."""
        return self.merge(*[group(features) for group in self.groups.values()])

    def lookup(
        self, features: KeyedJaggedTensor, lookup_only: frozenset[str] = frozenset()
    ) -> dict[str, JaggedTensor]:
        """Raw ids -> embeddings in one call (see HstuEmbeddings.lookup)."""
        features, misses = self.remap(features, lookup_only)
        return apply_misses(self(features), misses)

    def remap(
        self, features: KeyedJaggedTensor, lookup_only: frozenset[str] = frozenset()
    ) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
        """Dynamic tables' input stage, group by group (see HstuEmbeddings.remap)."""
        misses: dict[str, torch.Tensor] = {}
        for group in self.groups.values():
            features, part = group.remap(features, lookup_only)
            misses.update(part)
        return features, misses

    def stats(self) -> dict[str, dict[str, int | float]]:
        return {name: s for group in self.groups.values() for name, s in group.stats().items()}


def build_embeddings(
    tables: list[EmbeddingArgs],
    embedding_dims: dict[str, int],
    device: torch.device | str = "cpu",
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """One HstuEmbeddings when every table has the same dim, else one per dim (the
    ``options``, ``sparse_optimizer`` and ``materialize``: :func:`build_embedding_collection`'s)."""
    dims = sorted({embedding_dims[t.table_name] for t in tables})
    if len(dims) <= 1:
        return build_embedding_collection(tables, embedding_dims, device, seed, **options)
    groups = {
        d: build_embedding_collection(
            [t for t in tables if embedding_dims[t.table_name] == d],
            embedding_dims,
            device,
            seed * 1_000_003 + d,
            **options,
        )
        for d in dims
    }
    feature_dim = {f: embedding_dims[t.table_name] for t in tables for f in t.feature_names}
    return EmbeddingsByDim(groups, feature_dim)


__all__ = ["EmbeddingsByDim", "build_embeddings"]
