"""Retrieval model: next-item sampled softmax in training, full-corpus ranking in evaluation
(docs/model.md, "Heads and losses" and "Evaluation metrics").

Legend: B samples, H[b] history items, Q = sum(max(H-1, 0)) training queries of this rank,
M negatives per query, D hidden width (= item embedding dim), I items in the corpus, k top-k.

Training: the L2-normalised state of history item j's own token (with interleaved actions,
the item token, not the action token after it) is the query for item j+1: causally it has
seen items 0..j and actions 0..j-1, never item j+1. logits = cos(query, item) / temperature
for the positive and its negatives (``negative_sampling``: see :class:`RetrievalModel`); a
negative whose id equals the query's positive id (an accidental hit) is masked out (-inf).

Evaluation: the query is the state of each sample's last history item token; every item in
[min_item_id, num_items) is scored, the sample's input history is excluded (-inf), and the
target's rank is counted over the whole corpus (ties pessimistic, see hstu.model.metrics).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torchrec.sparse.jagged_tensor import JaggedTensor

from hstu.data.batch import Batch
from hstu.data.negatives import negatives_feature_name
from hstu.embeddings.collection import apply_misses
from hstu.model.encode import DenseModel
from hstu.model.hstu_block import HSTUBlock
from hstu.model.loss_scale import PendingScale
from hstu.model.tensor_parallel import take_own_rows
from hstu.model.tokens import TokenBuilder
from hstu.ops.gather import PendingCounts, gather_rows, world_of_several
from hstu.ops.jagged import index_within, lengths_to_offsets, segment_ids
from hstu.ops.losses import HistoryWindow, LossInputs, resolve_matmul_dtype
from hstu.ops.losses.vocab_parallel import CorpusShard, CorpusSource
from hstu.registry import LIVE_DRAW, NEGATIVE_SAMPLING, SHARED_DRAW, UNIFORM_DRAW, load


@dataclass
class NextItemQueries:
    """A batch's training queries: history item j < H - 1 of a sample predicts item j+1;
    online training (``Batch.first_trained``) counts position j as a query only from
    first_trained[b] on (its earlier items were trained on in an earlier window). Listed per
    sample in order, ``count`` (Q) of them, a count from the host (no nonzero of a mask)."""

    count: int
    has_next: torch.Tensor
    """[B]: each sample's queries."""
    segment: torch.Tensor
    """[Q]: each query's sample."""
    index: torch.Tensor
    """[Q]: each query's position j within its sample's history."""
    item_starts: torch.Tensor
    """[B]: where each sample's items start in the item feature."""
    query_rows: torch.Tensor
    """[Q]: the query's row among the history items [sum(H)]."""
    next_rows: torch.Tensor
    """[Q]: item j+1's row in the item feature (the target)."""


def next_item_queries(batch: Batch) -> NextItemQueries:
    skip = batch.first_trained
    hist = batch.history_lengths()
    count = batch.require_sizes().num_queries
    if skip is not None:
        skip = skip.to(hist.device)
    has_next = (hist - 1 - (0 if skip is None else skip)).clamp(min=0)
    segment = segment_ids(has_next, count)
    index = index_within(has_next, count)
    if skip is not None:
        index = index + skip[segment]
    item_starts = lengths_to_offsets(batch.item_lengths())[:-1]
    return NextItemQueries(
        count, has_next, segment, index, item_starts,
        query_rows=lengths_to_offsets(hist)[:-1][segment] + index,
        next_rows=item_starts[segment] + index + 1,
    )


def query_history_window(batch: Batch, own, item_ids: torch.Tensor, q_seg: torch.Tensor,
                         q_idx: torch.Tensor, item_starts: torch.Tensor,
                         max_item_seqlen: int = 0) -> HistoryWindow:
    """Each training query's history as a window into ``item_ids``: query j of a sample
    (:func:`next_item_queries`) sees that sample's items 0..j; the window's width is the
    longest history (the dataset's ``max_item_seqlen``, else the batch's, bounded by this
    batch's history items), known on the host."""
    longest = max_item_seqlen or batch.max_seqlen or own.sizes.num_history_items
    return HistoryWindow(
        ids=item_ids, starts=item_starts[q_seg], lengths=q_idx + 1,
        width=max(0, min(longest, own.sizes.num_history_items) - 1),
    )


@dataclass
class RetrievalEval:
    """top_ids int64 [B, k], top_scores [B, k] (cosine), target_ranks float [B] (inf: unranked)."""

    top_ids: torch.Tensor
    top_scores: torch.Tensor
    target_ranks: torch.Tensor


class RetrievalModel(DenseModel):
    """The dense part: forward(batch, embeddings) -> (loss, (pos_logits [Q], neg_logits [Q, M]));
    see the module docstring. ``embeddings``: the sparse module's output for the batch,
    including the negatives key (:mod:`hstu.data.negatives`) for uniform, mixed and
    full-corpus sampling.

    In training the loss is this rank's share of the global-batch mean over queries
    (:mod:`hstu.model.loss_scale`).

    Args:
        token_builder, block: as for ranking. Where the item feature is projected (item dim
            d < D), a ``query_projection`` (D -> d, no bias) maps the states into the items'
            space: queries and item embeddings are compared in d dimensions.
        num_items: ids are in [0, num_items).
        num_negatives: uniform negatives per query (-1: none, in-batch under "uniform").
        negative_sampling: a strategy of hstu.registry.NEGATIVE_SAMPLING ("uniform",
            "in_batch", "mixed", "mixed_logq", "shared", "full_corpus", "sampled_live";
            docs/model.md, "Heads and losses").
        temperature: softmax temperature on cosine similarities.
        full_corpus_matmul_dtype: "float32", "bfloat16" or "auto" (decided on the first
            step's device) for the full-corpus training loss's [Q, I] matmuls.
        l2_norm_eps: epsilon of the L2 normalisation.
        min_item_id: first real item id (1 when 0 is padding); lower ids are never sampled
            or retrieved.
        max_item_seqlen: longest H of the dataset (0: take the gathered batch's).
        tp_group: tensor-parallel group whose samples the dense part gathers.
    """

    def __init__(
        self,
        token_builder: TokenBuilder,
        block: HSTUBlock,
        *,
        num_items: int,
        num_negatives: int = -1,
        negative_sampling: str = "uniform",
        temperature: float = 0.05,
        full_corpus_matmul_dtype: str = "float32",
        l2_norm_eps: float = 1e-6,
        min_item_id: int = 0,
        max_item_seqlen: int = 0,
        tp_group: ProcessGroup | None = None,
        eval_exclude_history: bool = True,
        exclude_history_from_loss: bool = False,
    ) -> None:
        super().__init__(token_builder, block, max_item_seqlen, tp_group)
        # items narrower than D (NetworkArgs.item_embedding_dim < hidden_size): the queries
        # are projected down into the items' space (items are scored as they are stored, so
        # the corpus never goes through a projection)
        self.query_projection: nn.Linear | None = None
        if token_builder.item_feature_name in token_builder.projections:
            item_proj = token_builder.projections[token_builder.item_feature_name]
            self.query_projection = nn.Linear(
                item_proj.out_features, item_proj.in_features, bias=False,
                dtype=item_proj.weight.dtype,
            )
        self.num_items = num_items
        assert negative_sampling in NEGATIVE_SAMPLING, negative_sampling  # RetrievalArgs checks
        self.num_negatives = num_negatives
        self.negative_sampling = negative_sampling
        self.temperature = temperature
        # None: "auto", resolved on the device of the step's queries
        self.full_corpus_matmul_dtype: torch.dtype | None = (
            None if full_corpus_matmul_dtype == "auto"
            else resolve_matmul_dtype(full_corpus_matmul_dtype, torch.device("cpu"))[0]
        )
        self.l2_norm_eps = l2_norm_eps
        self.min_item_id = min_item_id
        self.eval_exclude_history = eval_exclude_history
        self.exclude_history_from_loss = exclude_history_from_loss
        self.negatives_feature = negatives_feature_name(token_builder.item_feature_name)
        # full corpus: where this rank's corpus rows come from (set by the RetrievalRecommender
        # around it: a plain attribute, not a submodule, so the dense part holds no table)
        self.corpus_source: CorpusSource | None = None
        self._not_admitted_targets: torch.Tensor | None = None

    @property
    def scores_corpus(self) -> bool:
        """Whether the training loss scores every item (negative_sampling="full_corpus"): the
        corpus comes from the item table's rows on this rank (:attr:`corpus_source`), never
        through the batch."""
        return self.negative_sampling == "full_corpus"

    @property
    def gathers_batch_positives(self) -> bool:
        """Whether the training loss scores the batch's positives (in-batch negatives): with
        several ranks, every rank's are gathered (the global batch's, as in one process)."""
        return NEGATIVE_SAMPLING[self.negative_sampling].scores_batch_positives(self.num_negatives)

    @property
    def draws(self) -> str | None:
        """What the data path draws into the negatives key (hstu.registry.NegativeSampling)."""
        return NEGATIVE_SAMPLING[self.negative_sampling].draw(self.num_negatives)

    # ------------------------------------------------------------------------ helpers

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), p=2.0, dim=-1, eps=self.l2_norm_eps)

    def project_queries(self, states: torch.Tensor) -> torch.Tensor:
        """Query states [N, D] -> the items' space [N, d] (unchanged where d = D). Applied
        to the TP group's replicated rows, before each rank takes its own."""
        return states if self.query_projection is None else self.query_projection(states)

    # ------------------------------------------------------------------------ training

    def forward(
        self, batch: Batch, embeddings: dict
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q = next_item_queries(batch)
        has_next, q_seg, q_idx, item_starts = q.has_next, q.segment, q.index, q.item_starts
        num_q, query_rows, next_rows = q.count, q.query_rows, q.next_rows
        # a dynamic item table's ids not admitted yet (admit_min_count): no row, so neither a
        # target (the query is left out, like padding) nor anyone's negative (id -1)
        not_admitted = None
        if self.training and batch.lookup_misses is not None:
            not_admitted = batch.lookup_misses.get(self.token_builder.item_feature_name)
        left_out = None if not_admitted is None else not_admitted.index_select(0, next_rows)
        count = has_next.sum()
        if left_out is not None:
            count = count - left_out.sum()
            self._count_not_admitted(left_out)
        pending = PendingScale(count, self.training)
        # in-batch negatives with several ranks: every rank's positives (their counts from the
        # host, gathered while the block runs; hstu.ops.gather)
        counts = (
            PendingCounts(batch.require_sizes().num_queries)
            if self.training and self.gathers_batch_positives and world_of_several()
            else None
        )
        corpus = self._corpus() if self.scores_corpus else None
        if corpus is not None and corpus.tbe:
            embeddings = self._route_item_rows(batch, embeddings, corpus)
        own, _, layout, tokens, states = self._states(batch, embeddings)
        projected = self.project_queries(states.index_select(0, tokens.history_query_rows))
        history_states = take_own_rows(projected, layout.history, self.tp_group)
        # (index_select rather than x[rows] on these [rows, D] / [Q, M] gathers: several times
        # faster on CPU, forward and backward; the same values)
        queries = self.normalise(history_states.index_select(0, query_rows))
        item_ids = own.item_ids
        if not_admitted is not None:
            item_ids = item_ids.masked_fill(not_admitted, -1)
        pos_ids = item_ids[next_rows]
        pos_vectors = self.normalise(own.item_values.index_select(0, next_rows))
        scale = pending.wait()
        draws = self.draws
        inputs = LossInputs(
            queries, pos_ids, pos_vectors, self.temperature, self.num_negatives, self.training,
            scale, self.min_item_id,
            self.full_corpus_matmul_dtype or resolve_matmul_dtype("auto", queries.device)[0],
        )
        if left_out is not None:
            inputs.target_kept = ~left_out
        if self.exclude_history_from_loss and self.training:
            inputs.history_mask = self.history_window(
                batch, own, item_ids, q_seg, q_idx, item_starts
            )
        if corpus is not None:
            inputs.corpus = corpus
            inputs.key_vectors = self.normalise(corpus.rows)
            if corpus.split:  # every rank's query and history-id counts (host ints, gathered)
                inputs.query_counts = PendingCounts(num_q).wait()
                if inputs.history_mask is not None:
                    inputs.history_id_counts = PendingCounts(own.item_ids.numel()).wait()
        if counts is not None:
            every = counts.wait()
            inputs.batch_pos_vectors = gather_rows(pos_vectors, every)
            inputs.batch_pos_ids = gather_rows(pos_ids, every)
        if draws is not None:
            # .keys(): a sharded lookup may still be a LazyAwaitable, which has no `in`
            if self.negatives_feature not in embeddings.keys():  # noqa: SIM118
                raise ValueError(
                    f"negative_sampling={self.negative_sampling!r} needs the batch to carry the "
                    f"{self.negatives_feature!r} key (hstu.data.negatives.NegativeSampler on the "
                    "loader)"
                )
            if draws == UNIFORM_DRAW:
                if batch.negative_index is None:
                    raise ValueError(
                        "uniform negatives need Batch.negative_index (hstu.data.negatives)"
                    )
                inputs.key_ids = batch.features[self.negatives_feature].values().to(queries.device)
                inputs.index = batch.negative_index.to(queries.device)
                inputs.order, inputs.offsets = batch.negative_order, batch.negative_offsets
            elif draws == SHARED_DRAW:
                inputs.key_ids = batch.features[self.negatives_feature].values().to(queries.device)
                inputs.population = self.num_items - self.min_item_id
            elif draws == LIVE_DRAW:
                if batch.negative_live is None:
                    raise ValueError(
                        "negative_sampling='sampled_live' needs the batch's live draws "
                        "(RetrievalRecommender.prepare fills them in training)"
                    )
                inputs.key_ids = batch.features[self.negatives_feature].values().to(queries.device)
                inputs.live_rows = batch.negative_live
            inputs.key_vectors = self.normalise(
                apply_misses(embeddings, batch.lookup_misses)[self.negatives_feature].values()
            )
        return load(NEGATIVE_SAMPLING[self.negative_sampling].loss)(inputs)

    def _count_not_admitted(self, left_out: torch.Tensor) -> None:
        """Adds the step's targets left out (not admitted) to this rank's running count, on
        the device (read by :meth:`take_not_admitted_targets`)."""
        n = left_out.sum()
        self._not_admitted_targets = (
            n if self._not_admitted_targets is None else self._not_admitted_targets + n
        )

    def take_not_admitted_targets(self) -> int:
        """This rank's training targets left out of the loss because their item was not
        admitted by the dynamic item table (admit_min_count), since the last call (a host
        read)."""
        n, self._not_admitted_targets = self._not_admitted_targets, None
        return 0 if n is None else int(n)

    def _corpus(self) -> CorpusShard:
        if self.corpus_source is None:
            raise ValueError(
                'negative_sampling="full_corpus" needs the model\'s corpus source (build the model '
                "with hstu.model.builder.build_model: RetrievalRecommender sets it)"
            )
        return self.corpus_source()

    def _route_item_rows(self, batch: Batch, embeddings, corpus: CorpusShard) -> dict:
        """The embeddings with the item feature's rows routing their gradient into the
        corpus shard's (:meth:`hstu.ops.losses.vocab_parallel.CorpusShard.batch_rows`)."""
        name = self.token_builder.item_feature_name
        out = {k: embeddings[k] for k in embeddings.keys()}  # noqa: SIM118 (may be a LazyAwaitable)
        jt = out[name]
        ids = batch.features[name].values()
        counts = PendingCounts(ids.numel()).wait() if corpus.split else None
        out[name] = JaggedTensor(
            values=corpus.batch_rows(jt.values(), ids, counts), lengths=jt.lengths()
        )
        return out

    def history_window(
        self, batch: Batch, own, item_ids: torch.Tensor, q_seg: torch.Tensor,
        q_idx: torch.Tensor, item_starts: torch.Tensor,
    ) -> HistoryWindow:
        """RetrievalArgs.exclude_history_from_loss: query j of a sample (it predicts item j + 1)
        leaves out the items at positions 0..j of that sample (``item_ids``: the item feature's,
        -1 where not admitted), except its target; the window's width is the longest history
        (the dataset's, else the batch's, bounded by this batch's history items), known on the
        host."""
        return query_history_window(batch, own, item_ids, q_seg, q_idx, item_starts,
                                    self.max_item_seqlen)

    # ---------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def last_queries(
        self, batch: Batch, embeddings: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised query of each own sample's last history item token [B, d], and the own history
        (item ids [sum(H)], their sample index [sum(H)])."""
        own, inputs, layout, tokens, states = self._states(batch, embeddings)
        # the query row of each sample's last history item (as in training); a sample
        # without history falls back to its last token
        hist_all = inputs.history_lengths
        last_hist = lengths_to_offsets(hist_all)[1:] - 1
        rows = tokens.offsets[1:] - 1
        if tokens.history_query_rows.numel() > 0:
            from_hist = tokens.history_query_rows[last_hist.clamp(min=0)]
            rows = torch.where(hist_all > 0, from_hist, rows)
        last = self.project_queries(states[rows])  # [B_all, d]
        last = take_own_rows(last, layout.samples, self.tp_group)
        hist = own.history_lengths
        seg = segment_ids(hist, own.sizes.num_history_items)
        within = index_within(hist, own.sizes.num_history_items)
        rows = lengths_to_offsets(own.item_lengths)[:-1][seg] + within
        return self.normalise(last), own.item_ids[rows], seg

    @torch.no_grad()
    def evaluate(
        self,
        batch: Batch,
        embeddings: dict,
        corpus: torch.Tensor,
        top_k: int = 200,
        chunk_size: int = 65536,
    ) -> RetrievalEval:
        """Full-corpus top-k and target ranks for each own sample (targets in batch.labels).

        ``corpus`` [I, D]: normalised vectors of ids [0, num_items) (the top-level model's
        ``corpus_vectors``); scored ``chunk_size`` items at a time (memory B x chunk) by
        :class:`CorpusSliceScorer`: a target's score is its column of the very matmul every
        other item's score comes from (ties exact; a first pass reads the targets' columns).
        """
        queries, history_ids, history_seg = self.last_queries(batch, embeddings)
        bsz, device = queries.shape[0], queries.device
        targets = (
            batch.labels if batch.labels is not None else torch.full((bsz,), -1, dtype=torch.int64)
        )
        if not self.eval_exclude_history:  # every item rankable, the history's too
            history_ids, history_seg = history_ids[:0], history_seg[:0]
        scorer = CorpusSliceScorer(
            CorpusQueries.build(queries, targets.to(device), history_ids, history_seg),
            num_items=self.num_items, min_item_id=self.min_item_id,
        )
        blocks = [
            (start, min(start + chunk_size, self.num_items), corpus[start : start + chunk_size])
            for start in range(0, self.num_items, chunk_size)
        ]
        target_scores = scorer.target_scores(blocks)
        k = min(top_k, self.num_items)
        top_scores = queries.new_full((bsz, 0), float("-inf"))
        top_ids = torch.zeros((bsz, 0), dtype=torch.int64, device=device)
        ahead = torch.zeros(bsz, dtype=torch.int64, device=device)
        for start, end, vectors in blocks:
            scores = scorer.block_scores(vectors, start, end)  # [B, chunk]
            ahead += (scores >= target_scores.unsqueeze(1)).sum(1)
            ahead -= scorer.targets_in(start, end).long()  # the target never counts against itself
            ids = torch.arange(start, end, device=device).expand(bsz, -1)
            merged_scores = torch.cat([top_scores, scores], 1)
            merged_ids = torch.cat([top_ids, ids], 1)
            top_scores, pick = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            top_ids = merged_ids.gather(1, pick)
        ranks = scorer.ranks(target_scores, ahead)
        return RetrievalEval(top_ids=top_ids, top_scores=top_scores, target_ranks=ranks)


# ------------------------------------------------------------ sharded full-corpus ranking
#
# Evaluation over catalogues of millions of items (hstu.training.evaluate; docs/model.md,
# "Evaluation metrics"): each rank scores the blocks of its slice of one global grid. A block
# is the same matmul whatever the world size, so 1 and W processes give the same ranks.

# bytes per (query, item) entry of a block: its float32 score, the bool comparison with the
# target, and torch's temporaries around them
_BLOCK_ENTRY_BYTES = 12


# on CPU a block's float32 scores are kept within this many bytes so that the comparison
# pass reads them from cache: with 1,000 queries, blocks of ~1k items score a 2.2M-item slice
# in 0.6x the time of the 22k-item blocks the 256 MiB budget alone allows (this 2-core host)
CPU_BLOCK_SCORE_BYTES = 4 << 20
_CPU_MIN_BLOCK_ITEMS = 256


def eval_block_items(
    num_queries: int, budget_bytes: int, device: torch.device | None = None
) -> int:
    """Items per block so that a block's [num_queries, items] work stays within the budget
    (at least 1); on CPU also within :data:`CPU_BLOCK_SCORE_BYTES` of scores (at least
    256 items)."""
    n = max(num_queries, 1)
    items = max(1, budget_bytes // (_BLOCK_ENTRY_BYTES * n))
    if device is not None and device.type == "cpu":
        items = min(items, max(_CPU_MIN_BLOCK_ITEMS, CPU_BLOCK_SCORE_BYTES // (4 * n)))
    return items


def block_grid(num_items: int, block: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The blocks [start, end) of rank ``rank``'s slice: the global grid of ``block`` items
    over [0, num_items), contiguous runs of blocks per rank (rank order = id order)."""
    count = -(-num_items // block)
    first, last = rank * count // world, (rank + 1) * count // world
    return [(b * block, min((b + 1) * block, num_items)) for b in range(first, last)]


@dataclass
class CorpusQueries:
    """What full-corpus ranking reads about N queries (every rank's, gathered)."""

    queries: torch.Tensor
    """[N, D] normalised."""
    targets: torch.Tensor
    """int64 [N]; outside [min_item_id, num_items): unranked."""
    excluded_ids: torch.Tensor
    """int64 [T]: items never ranked for a query (its input history), sorted ascending."""
    excluded_rows: torch.Tensor
    """int64 [T]: the query of each excluded id."""

    @staticmethod
    def build(queries, targets, history_ids, history_rows) -> CorpusQueries:
        order = torch.argsort(history_ids, stable=True)
        return CorpusQueries(queries, targets, history_ids[order], history_rows[order])


class CorpusSliceScorer:
    """Scores N queries against blocks of the catalogue: ``block_scores`` is the [N, items]
    score matrix of one block (cosine; -inf below ``min_item_id`` and on each query's excluded
    ids), the one matmul that every count and every top-k entry of that block reads."""

    def __init__(self, q: CorpusQueries, *, num_items: int, min_item_id: int) -> None:
        self.q, self.num_items, self.min_item_id = q, num_items, min_item_id
        t = q.targets
        self.rows = torch.arange(t.numel(), device=t.device)
        in_corpus = (t >= min_item_id) & (t < num_items)
        in_history = torch.zeros_like(in_corpus)
        hit = q.excluded_ids == t[q.excluded_rows]
        in_history[q.excluded_rows[hit]] = True
        self.unranked = ~in_corpus | in_history

    def block_scores(self, vectors: torch.Tensor, start: int, end: int) -> torch.Tensor:
        scores = self.q.queries @ vectors.t()
        if start < self.min_item_id:
            scores[:, : min(self.min_item_id, end) - start] = float("-inf")
        lo, hi = torch.searchsorted(
            self.q.excluded_ids, torch.tensor([start, end], device=scores.device)
        ).tolist()
        ex_ids, ex_rows = self.q.excluded_ids[lo:hi], self.q.excluded_rows[lo:hi]
        scores[ex_rows, ex_ids - start] = float("-inf")
        return scores

    def targets_in(self, start: int, end: int) -> torch.Tensor:
        """bool [N]: the ranked targets in [start, end)."""
        t = self.q.targets
        return ~self.unranked & (t >= start) & (t < end)

    def target_scores(self, blocks: Iterable[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
        """[N]: each ranked target's score from its block's matmul where the block is among
        ``blocks`` ((start, end, vectors)), else -inf (another rank's; merged by max)."""
        out = self.q.queries.new_full((self.q.targets.numel(),), float("-inf"))
        for start, end, vectors in blocks:
            own = self.targets_in(start, end)
            if bool(own.any()):
                scores = self.block_scores(vectors, start, end)
                out[own] = scores[self.rows[own], self.q.targets[own] - start]
        return out

    def count_and_top(
        self, blocks: Iterable[tuple[int, int, torch.Tensor]], target_scores: torch.Tensor,
        top_k: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(how many items of ``blocks`` score >= the target [N] (the target itself not
        counted; excluded ids never), top_scores [N, k'], top_ids [N, k']) with k' = min(top_k,
        items in blocks): the top-k ordered by score, descending, then id, ascending (exact:
        a stable sort of each block, only when top_k > 0)."""
        n = self.q.targets.numel()
        dev = self.q.queries.device
        ahead = torch.zeros(n, dtype=torch.int64, device=dev)
        top_scores = self.q.queries.new_empty((n, 0))
        top_ids = torch.empty((n, 0), dtype=torch.int64, device=dev)
        threshold = target_scores.unsqueeze(1)
        for start, end, vectors in blocks:
            scores = self.block_scores(vectors, start, end)
            # an int32 sum: several times cheaper on CPU than the default int64 one
            ahead += (scores >= threshold).sum(1, dtype=torch.int32)
            # the target never counts against itself (its own score is >= itself)
            ahead -= self.targets_in(start, end).long()
            if top_k > 0:
                s, i = torch.sort(scores, dim=1, descending=True, stable=True)
                k = min(top_k, s.shape[1])
                # earlier blocks hold lower ids: listed first, a stable sort keeps them first
                top_scores, pick = torch.sort(
                    torch.cat([top_scores, s[:, :k]], 1), dim=1, descending=True, stable=True
                )
                top_ids = torch.cat([top_ids, i[:, :k] + start], 1).gather(1, pick)
                top_scores, top_ids = top_scores[:, :top_k], top_ids[:, :top_k]
        return ahead, top_scores, top_ids

    def ranks(self, target_scores: torch.Tensor, ahead: torch.Tensor) -> torch.Tensor:
        """1-based target ranks [N] (float; inf: unranked) from the merged counts."""
        unranked = self.unranked | torch.isneginf(target_scores)
        return (ahead + 1).float().masked_fill(unranked, float("inf"))


def merge_top(
    parts: list[tuple[torch.Tensor, torch.Tensor]], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of several slices' top-k lists ((scores [N, k_r], ids [N, k_r]) in id order
    of their slices): the same order as one list over every item (score descending, then id)."""
    scores = torch.cat([s for s, _ in parts], 1)
    ids = torch.cat([i for _, i in parts], 1)
    scores, pick = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores[:, :top_k], ids.gather(1, pick)[:, :top_k]


__all__ = [
    "CorpusQueries",
    "CorpusSliceScorer",
    "RetrievalEval",
    "RetrievalModel",
    "block_grid",
    "eval_block_items",
    "merge_top",
    "next_item_queries",
]
