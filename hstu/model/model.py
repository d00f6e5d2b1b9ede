"""The top level of every model: a sparse module, then a dense module.

    embeddings = self.sparse(batch.features)     # the embedding tables (TorchRec-sharded)
    return self.dense(batch, embeddings)         # tokens -> HSTU -> head -> loss

This is the shape TorchRec's train pipelines look for (they fx-trace the top level, find the
one call of each sharded module fed straight from the batch, and run its input distribution
for the next batch during this one); the dense module has no sharded child, so the tracer
keeps it as a leaf, and the trainer wraps it (alone) in DistributedDataParallel over the
data-parallel group. Attributes of the dense module (``block``, ``head``, ...) are reachable
on the top level for convenience.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import Batch
from hstu.embeddings.collection import apply_misses


class GenerativeRecommender(nn.Module):
    """forward(batch) -> the dense module's (loss, outputs)."""

    def __init__(self, sparse: nn.Module, dense: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse
        self.dense = dense

    def forward(self, batch: Batch) -> Any:
        embeddings = self.sparse(batch.features)
        return self.dense(batch, embeddings)

    lookup_only: frozenset[str] = frozenset()
    """Features whose ids are looked up but never admitted by dynamic tables (negatives)."""

    def prepare(self, batch: Batch) -> Batch:
        """The input stage: dynamic tables map raw ids to slots (admitting new ids in
        training: a collective, every rank calls it for every batch in the same order). A
        no-op without dynamic tables. The trainer calls it as batches are read, before the
        train pipeline sees them; evaluation before each lookup."""
        remap = getattr(self.sparse, "remap", None)
        if remap is None:
            return batch
        features, misses = remap(batch.features, self.lookup_only)
        if features is batch.features:
            return batch
        return replace(batch, features=features, lookup_misses=misses or None)

    @property
    def dense_module(self) -> nn.Module:
        """The dense module without its DistributedDataParallel wrapper."""
        dense = self.dense
        return dense.module if isinstance(dense, nn.parallel.DistributedDataParallel) else dense

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("sparse", "dense") or name.startswith("_"):
                raise
            return getattr(self.dense_module, name)


class RetrievalRecommender(GenerativeRecommender):
    """Adds what evaluation needs: item lookups through the sparse module and full-corpus
    scoring. ``feature_names``: every key of a batch's KeyedJaggedTensor, in the loader's order
    (a sharded collection fixes its key order on its first call, so side lookups send the same
    keys, the others empty)."""

    def __init__(self, sparse: nn.Module, dense: nn.Module, feature_names: list[str]) -> None:
        super().__init__(sparse, dense)
        self.feature_names = list(feature_names)
        negatives = getattr(dense, "negatives_feature", None)
        if negatives is not None:
            self.lookup_only = frozenset([negatives])
        if getattr(dense, "scores_corpus", False):
            # the full-corpus loss reads the item rows this rank holds (never a lookup of the
            # catalogue's ids); the sparse module is looked up when called: sharding replaces it
            from hstu.checks import check_full_corpus_table
            from hstu.ops.losses.vocab_parallel import CorpusSource

            item = dense.token_builder.item_feature_name
            check_full_corpus_table(sparse, item)
            dense.corpus_source = CorpusSource(
                lambda: self.sparse, item, dense.min_item_id, dense.num_items,
                lambda ids: self.lookup_items(ids.to(next(dense.parameters()).device)),
            )

    def lookup_items(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> [N, D] raw item embeddings through the sparse module (every rank calls)."""
        item = self.dense_module.token_builder.item_feature_name
        lengths = torch.cat([
            torch.tensor([ids.numel()] if k == item else [0], dtype=torch.int64)
            for k in self.feature_names
        ]).to(ids.device)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.feature_names, values=ids.to(torch.int64), lengths=lengths
        )
        misses: dict = {}
        remap = getattr(self.sparse, "remap", None)
        if remap is not None:
            kjt, misses = remap(kjt, frozenset(self.feature_names))  # never admits
        return apply_misses(self.sparse(kjt), misses)[item].values()

    @torch.no_grad()
    def corpus_vectors(self, chunk_size: int = 65536) -> torch.Tensor:
        """[I, D] normalised item vectors of ids [0, num_items), looked up chunk by chunk.

        Every rank must call it (a sharded table looks up collectively).
        """
        dense = self.dense_module
        device = next(dense.block.parameters()).device
        parts = []
        for start in range(0, dense.num_items, chunk_size):
            ids = torch.arange(start, min(start + chunk_size, dense.num_items), device=device)
            parts.append(dense.normalise(self.lookup_items(ids)))
        return torch.cat(parts)

    @torch.no_grad()
    def last_queries(self, batch: Batch):
        batch = self.prepare(batch)
        return self.dense_module.last_queries(batch, self.sparse(batch.features))

    @torch.no_grad()
    def evaluate(
        self,
        batch: Batch,
        top_k: int = 200,
        chunk_size: int = 65536,
        corpus: torch.Tensor | None = None,
    ):
        """Full-corpus top-k and target ranks of each own sample (see RetrievalModel.evaluate);
        ``corpus`` from :meth:`corpus_vectors` can be reused across batches."""
        if corpus is None:
            corpus = self.corpus_vectors(chunk_size)
        batch = self.prepare(batch)
        embeddings = self.sparse(batch.features)
        return self.dense_module.evaluate(
            batch, embeddings, corpus, top_k=top_k, chunk_size=chunk_size
        )


__all__ = ["GenerativeRecommender", "RetrievalRecommender"]
