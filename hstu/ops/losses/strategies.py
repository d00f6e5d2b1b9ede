"""The training loss of each negative-sampling strategy (hstu.registry.NEGATIVE_SAMPLING).

Legend: Q training queries of this rank, M negatives per query, U distinct drawn ids, I items
of the corpus, D width. Each function takes a :class:`LossInputs` and returns
(loss, (pos_logits [Q], neg_logits [Q, M] or None where nothing reads them)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hstu.ops.losses.common import CPU_ONLY
from hstu.ops.losses.full_corpus import HistoryWindow, full_corpus_loss
from hstu.ops.losses.sampled import (
    SharedRows,
    corrected_softmax_loss,
    expected_counts,
    fused_sampled_loss_applies,
    negative_vectors,
    sampled_softmax_loss,
    sampled_softmax_loss_shared,
)
from hstu.sync_audit import allowed_sync

if TYPE_CHECKING:
    from hstu.ops.losses.vocab_parallel import CorpusShard

LossOutput = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class LossInputs:
    """What a retrieval training loss reads (the model fills it from the batch)."""

    queries: torch.Tensor
    """[Q, D], L2-normalised."""
    pos_ids: torch.Tensor
    """int64 [Q], the next item of each query."""
    pos_vectors: torch.Tensor
    """[Q, D], L2-normalised."""
    temperature: float
    num_negatives: int
    training: bool
    scale: torch.Tensor | None
    """None: the mean over queries; else the sum times this (hstu.model.loss_scale)."""
    min_item_id: int
    matmul_dtype: torch.dtype
    """Full corpus: the dtype of the [Q, I] matmuls."""
    key_ids: torch.Tensor | None = None
    """Uniform and shared draws: int64 [U], the ascending ids of the batch's negatives key."""
    key_vectors: torch.Tensor | None = None
    """The negatives key's vectors, normalised: [U, D] (uniform, shared) or [I, D] (full corpus)."""
    index: torch.Tensor | None = None
    """Uniform draws: int64 [Q, M] into key_ids (Batch.negative_index)."""
    order: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    """The index's transpose from the data path (Batch.negative_order / negative_offsets)."""
    batch_pos_vectors: torch.Tensor | None = None
    """In-batch negatives with several ranks: [N, D], the positives of the whole global batch
    (every rank's pos_vectors, rank order; gradients flow back to their rank:
    hstu.ops.gather); None: pos_vectors are the batch's."""
    batch_pos_ids: torch.Tensor | None = None
    """int64 [N], their ids (with batch_pos_vectors)."""
    history_mask: HistoryWindow | None = None
    """Full corpus and sampled_live, RetrievalArgs.exclude_history_from_loss: the items of each
    query's own history (item ids; sampled_live: the table's slots), left out of its softmax."""
    corpus: CorpusShard | None = None
    """Full corpus: this rank's rows of the corpus (key_vectors holds them normalised)."""
    query_counts: list[int] | None = None
    """Full corpus split over the ranks: every rank's Q."""
    history_id_counts: list[int] | None = None
    """Full corpus split over the ranks, with history_mask: every rank's number of window ids."""
    population: int | None = None
    """mixed_logq: how many items the uniform draws are drawn from (num_items - min_item_id)."""
    live_rows: int | None = None
    """sampled_live: how many live rows of the dynamic item table the key's rows (key_ids:
    slots, in draw order, repeats kept) were drawn from."""
    target_kept: torch.Tensor | None = None
    """bool [Q], dynamic item table with admission: False where the query's target was not
    admitted (it has no row; its pos_id is -1): the query adds nothing to the loss and no
    negative of id -1 is scored. None: every query counts."""


Group = tuple[torch.Tensor | SharedRows, torch.Tensor]  # negatives' vectors and their ids


def _softmax(x: LossInputs, groups: list[Group]) -> LossOutput:
    loss, pos_logits, neg_logits = sampled_softmax_loss(
        x.queries, x.pos_vectors, x.pos_ids, [v for v, _ in groups], [i for _, i in groups],
        x.temperature, x.scale, x.target_kept,
    )
    return loss, (pos_logits.detach(), neg_logits.detach())


def _shared(x: LossInputs) -> SharedRows | torch.Tensor:
    return negative_vectors(x.key_vectors, x.index, x.order, x.offsets)


def _drawn(x: LossInputs, shared: SharedRows | torch.Tensor) -> Group:
    """The uniform draws as one group of negatives (vectors, ids [Q, M])."""
    return shared, x.key_ids.index_select(0, x.index.reshape(-1)).view(x.index.shape)


def _in_batch(x: LossInputs) -> Group:
    """The other positives of the (global) batch as negatives (shared by every query; the
    query's own positive, and any other of the same id, masked by id)."""
    if x.batch_pos_vectors is not None:
        return x.batch_pos_vectors, x.batch_pos_ids
    return x.pos_vectors, x.pos_ids


def uniform(x: LossInputs) -> LossOutput:
    """num_negatives uniform draws per query (one fused loss on CPU); -1: in-batch."""
    if x.num_negatives <= 0:
        return _softmax(x, [_in_batch(x)])
    shared = _shared(x)
    fused = (x.training and torch.is_grad_enabled() and x.target_kept is None
             and fused_sampled_loss_applies(x.queries, shared))
    if fused:
        with allowed_sync(CPU_ONLY):  # the data path's ids are ascending
            fused = bool((x.key_ids[1:] > x.key_ids[:-1]).all())
    if fused:
        loss, pos_logits = sampled_softmax_loss_shared(
            x.queries, x.pos_vectors, x.pos_ids, shared, x.key_ids, x.temperature, x.scale
        )
        # nothing reads a training step's [Q, M] logits: not kept
        return loss, (pos_logits.detach(), None)
    return _softmax(x, [_drawn(x, shared)])


def in_batch(x: LossInputs) -> LossOutput:
    """The other positives of the global batch."""
    return _softmax(x, [_in_batch(x)])


def mixed(x: LossInputs) -> LossOutput:
    """num_negatives uniform draws per query plus the in-batch positives."""
    return _softmax(x, [_drawn(x, _shared(x)), _in_batch(x)])


def shared(x: LossInputs) -> LossOutput:
    """One set of uniform draws per batch (the distinct ids of num_negatives draws), scored by
    every query: [Q, U] logits from one matmul, accidental hits masked. No logQ correction:
    uniform draws give every item the same sampling probability, so the correction would add
    one constant to every negative's logit (no item favoured over another), as the per-query
    uniform strategy, which has none either."""
    return _softmax(x, [(x.key_vectors, x.key_ids)])


def mixed_logq(x: LossInputs) -> LossOutput:
    """A static catalogue's sampled softmax: the negatives of every query are the global
    batch's positives (in-batch) plus the batch's num_negatives uniform draws (key_ids: their
    distinct ids, drawn once per batch and scored by every query: one [Q, N + U] matmul), the
    query's own positive left out of them. logQ correction: each logit, the positive's too,
    less the log of its item's expected count among those negatives (its count among the
    batch's positives + the chance it is among the uniform draws:
    :func:`~hstu.ops.losses.sampled.expected_counts`), so that the in-batch negatives do not
    push popular items down for being popular. With RetrievalArgs.exclude_history_from_loss,
    the items of each query's own history are left out of its negatives."""
    assert x.population is not None
    return _corrected(x, x.num_negatives, x.population, distinct=True)


def sampled_live(x: LossInputs) -> LossOutput:
    """A dynamic item table's sampled softmax: the negatives of every query are the global
    batch's positives (in-batch) plus the step's num_negatives uniform draws over the table's
    live rows (key_ids, shared by every query; ids are the table's slots), the query's own
    positive left out of them. logQ correction: each logit, the positive's too, less the log
    of its item's expected count among those negatives (count among the batch's positives +
    num_negatives / live rows: :func:`~hstu.ops.losses.sampled.expected_counts`), so that
    neither frequent items of the batch nor the uniform draws are over-weighted."""
    assert x.live_rows is not None and x.key_ids is not None
    return _corrected(x, x.key_ids.numel(), x.live_rows, distinct=False)


def _corrected(x: LossInputs, draws: int, population: int, distinct: bool) -> LossOutput:
    """The logQ-corrected softmax over the in-batch positives and the drawn key rows shared by
    every query (mixed_logq, sampled_live): each logit less the log of its item's expected
    count among the negatives (:func:`~hstu.ops.losses.sampled.expected_counts`); the query's
    history left out with RetrievalArgs.exclude_history_from_loss."""
    assert x.key_vectors is not None and x.key_ids is not None
    batch_vectors, batch_ids = _in_batch(x)
    neg_ids = torch.cat([batch_ids, x.key_ids])
    pos_log_q = expected_counts(batch_ids, draws, population, x.pos_ids, distinct).log()
    neg_log_q = expected_counts(batch_ids, draws, population, neg_ids, distinct).log()
    excluded = None
    if x.history_mask is not None:  # RetrievalArgs.exclude_history_from_loss
        excluded = history_columns(x.history_mask, neg_ids, x.pos_ids)
    loss, pos_logits, neg_logits = corrected_softmax_loss(
        x.queries, x.pos_vectors, x.pos_ids, torch.cat([batch_vectors, x.key_vectors]), neg_ids,
        pos_log_q, neg_log_q, x.temperature, x.scale, excluded, x.target_kept,
    )
    return loss, (pos_logits.detach(), neg_logits.detach())


def history_columns(
    window: HistoryWindow, neg_ids: torch.Tensor, pos_ids: torch.Tensor
) -> torch.Tensor:
    """[Q, K]: -inf where negative column k (id ``neg_ids[k]``, shared by every query; ids may
    repeat) holds an item of query q's history window, 0 elsewhere; never at the query's
    target. The window's ids become the position of their first column in the sorted
    negatives (:meth:`HistoryWindow.mask_` marks those, block by block, no pair list), then
    every column reads its id's first position: fixed sizes, no host read."""
    ordered = torch.sort(neg_ids).values
    k = ordered.numel()

    def first(ids: torch.Tensor) -> torch.Tensor:  # -1: not among the negatives
        if k == 0:
            return torch.full_like(ids, -1)
        at = torch.searchsorted(ordered, ids)
        hit = ordered.index_select(0, at.clamp(max=k - 1)) == ids
        return torch.where(hit, at, torch.full_like(at, -1))

    add = torch.zeros((pos_ids.numel(), k), dtype=torch.float32, device=neg_ids.device)
    HistoryWindow(first(window.ids), window.starts, window.lengths, window.width).mask_(
        add, 0, first(pos_ids)
    )
    return add.index_select(1, first(neg_ids))


def full_corpus(x: LossInputs) -> LossOutput:
    """Every item of the corpus: the exact softmax. With the corpus split over the ranks
    (a model-parallel item table on several ranks), each rank scores every rank's queries
    against its own rows and the softmax is reduced across them
    (:func:`hstu.ops.losses.vocab_parallel.vocab_parallel_loss`)."""
    if x.target_kept is not None:  # (hstu.checks refuses full_corpus over a dynamic item table)
        raise ValueError("negative_sampling='full_corpus' has no targets left out: a static "
                         "item table admits every id")
    if x.corpus is not None and x.corpus.split:
        from hstu.ops.losses.vocab_parallel import vocab_parallel_loss

        assert x.query_counts is not None, "a split corpus needs every rank's query count"
        loss, pos = vocab_parallel_loss(
            x.queries, x.pos_ids, x.key_vectors, x.corpus.start, counts=x.query_counts,
            temperature=x.temperature, scale=x.scale, window=x.history_mask,
            id_counts=x.history_id_counts, corpus_grad_factor=1.0 / x.corpus.world,
            matmul_dtype=x.matmul_dtype,
        )
        return loss, (pos.detach(), None)
    return full_corpus_loss(
        x.queries, x.pos_ids, x.key_vectors, temperature=x.temperature,
        min_item_id=x.min_item_id, matmul_dtype=x.matmul_dtype, training=x.training,
        scale=x.scale, masked=x.history_mask,
    )


__all__ = [
    "LossInputs", "LossOutput", "full_corpus", "in_batch", "mixed", "mixed_logq", "sampled_live",
    "shared",
    "uniform",
]
