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

import itertools
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import Batch
from hstu.embeddings.collection import HstuEmbeddings, apply_misses
from hstu.embeddings.dynamic import HOST_REMAP, DynamicIdRemapper
from hstu.registry import LIVE_DRAW
from hstu.sync_audit import allowed_sync


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
        if getattr(dense, "draws", None) == LIVE_DRAW:
            from hstu.checks import check_live_table

            check_live_table(sparse, dense.token_builder.item_feature_name)
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

    # ------------------------------------------------------------- the live catalogue

    def item_remapper(self) -> DynamicIdRemapper | None:
        """The remapper of the dynamic item table (None: the item table is static)."""
        item = self.dense_module.token_builder.item_feature_name
        for module in self.sparse.modules():
            if isinstance(module, HstuEmbeddings):
                remapper = module.remapper_of(item)
                if remapper is not None:
                    return remapper
        return None

    def live_items(self) -> torch.Tensor | None:
        """The items a dynamic item table holds now (its occupied rows' ids, those >=
        ``min_item_id``): int64 [L] ascending, the same on every rank; None with a static item
        table (its catalogue is every id of [min_item_id, num_items))."""
        remapper = self.item_remapper()
        if remapper is None:
            return None
        return remapper.live_ids(self.dense_module.min_item_id)

    def catalogue(self, items: torch.Tensor | None = None) -> torch.Tensor | None:
        """What evaluation ranks over: ``items`` (sorted, distinct) after checking that the
        item table holds each of them (a dynamic table: a live row; a static one: an id of
        [min_item_id, num_items)), or, without ``items``, :meth:`live_items` (None: every
        id of a static table)."""
        if items is None:
            return self.live_items()
        items = torch.unique(items.to("cpu", torch.int64))  # ascending
        dense = self.dense_module
        remapper = self.item_remapper()
        if remapper is not None:
            with allowed_sync(HOST_REMAP):
                _, held = remapper.lookup(items)
            held &= items >= dense.min_item_id
            what = "live rows of the dynamic item table"
        else:
            held = (items >= dense.min_item_id) & (items < dense.num_items)
            what = f"ids of the item table [{dense.min_item_id}, {dense.num_items})"
        if not bool(held.all()):
            missing = items[~held]
            raise ValueError(
                f"evaluation items: {missing.numel()} of the {items.numel()} given are not "
                f"{what} (e.g. {int(missing[0])})"
            )
        return items

    def prepare(self, batch: Batch) -> Batch:
        """The input stage (:meth:`GenerativeRecommender.prepare`), then, in training with
        negative_sampling="sampled_live", the negatives key filled with ``num_negatives``
        rows drawn uniformly over the dynamic item table's live rows after this batch's
        admissions (slots, looked up as they are: never admitted, so a draw evicts nothing),
        and ``Batch.negative_live`` set to how many live rows they were drawn from."""
        batch = super().prepare(batch)
        dense = self.dense_module
        if not self.training or getattr(dense, "draws", None) != LIVE_DRAW:
            return batch
        item = dense.token_builder.item_feature_name
        for module in self.sparse.modules():
            if isinstance(module, HstuEmbeddings) and module.remapper_of(item) is not None:
                slots, _, live = module.draw_live(item, dense.num_negatives, dense.min_item_id)
                break
        else:  # refused when the model is built (hstu.checks.check_live_table)
            raise ValueError(
                f"negative_sampling='sampled_live': no dynamic table looks up {item!r}"
            )
        features = _with_key_values(batch.features, dense.negatives_feature, slots)
        misses = {k: v for k, v in (batch.lookup_misses or {}).items()
                  if k != dense.negatives_feature}
        return replace(batch, features=features, lookup_misses=misses or None,
                       negative_live=live)

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

    def _looked_up(self, batch: Batch) -> tuple[Batch, Any]:
        """(the batch for the dense part, its embeddings) in evaluation: looked up through
        the input stage; with a dynamic item table the dense part reads the raw item ids
        (history exclusion compares them with the targets' ids), not the rows' slots."""
        prepared = self.prepare(batch)
        embeddings = self.sparse(prepared.features)
        if self.item_remapper() is not None:
            prepared = replace(prepared, features=batch.features)
        return prepared, embeddings

    @torch.no_grad()
    def last_queries(self, batch: Batch):
        return self.dense_module.last_queries(*self._looked_up(batch))

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
        return self.dense_module.evaluate(
            *self._looked_up(batch), corpus, top_k=top_k, chunk_size=chunk_size
        )


def _with_key_values(
    features: KeyedJaggedTensor, key: str, values: torch.Tensor
) -> KeyedJaggedTensor:
    """``features`` (host) with the values of ``key`` replaced by ``values``, all in its first
    sample's slot (as the data path's negatives keys), the other keys unchanged."""
    assert features.weights_or_none() is None, "a weighted KeyedJaggedTensor"
    keys = features.keys()
    at = keys.index(key)
    offsets = features.offset_per_key()
    per_key = list(features.length_per_key())
    stride = features.stride()
    old = features.values()
    new_values = torch.cat([old[: offsets[at]], values.to(old.dtype), old[offsets[at + 1]:]])
    lengths = features.lengths().clone()
    key_lengths = lengths[at * stride:(at + 1) * stride]
    key_lengths.zero_()
    if stride > 0:
        key_lengths[0] = values.numel()
    per_key[at] = values.numel()
    if old.is_pinned():  # keeps the pipeline's host-to-device copy asynchronous
        new_values = new_values.pin_memory()
    return KeyedJaggedTensor(
        keys=keys, values=new_values, lengths=lengths,
        stride=stride, length_per_key=per_key,
        offset_per_key=[0, *itertools.accumulate(per_key)],
    )


__all__ = ["GenerativeRecommender", "RetrievalRecommender"]
