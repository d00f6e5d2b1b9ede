"""Sampled softmax over [positive, negatives] per query, and its CPU kernels.

Legend: Q queries, M negatives per query, U distinct negative rows, D width.

Negatives come as shared vectors [M, D], per-query vectors [Q, M, D], or
:class:`SharedRows` (U distinct rows and a [Q, M] index into them, the data path's uniform
draws). On CPU the scores of shared rows are a sampled dense-dense matmul
(:class:`_SampledScores`) and one group of them has a fused loss
(:func:`sampled_softmax_loss_shared`); elsewhere plain matmuls and gathers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hstu.ops.losses.common import CPU_ONLY, softmax_lse_
from hstu.sync_audit import allowed_sync

# the sampled-score kernels build CSR patterns; torch warns once that CSR is "beta"
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class SharedRows:
    """Per-query negatives as rows [U, D] and an index [Q, M] into them: the same vectors
    as ``rows[index]`` ([Q, M, D]) without materialising them."""

    rows: torch.Tensor
    index: torch.Tensor
    # the index's transpose from the data path (Batch.negative_order / negative_offsets), if any
    order: torch.Tensor | None = None
    offsets: torch.Tensor | None = None


class _SampledScores(torch.autograd.Function):
    """scores[q, m] = <queries[q], rows[index[q, m]]> without the dense [Q, U] matrix.

    Forward is a sampled dense-dense matmul on the CSR pattern of ``index`` (Q x M of the
    Q x U products); backward is grad_queries = G @ rows and grad_rows = G^T @ queries as
    weighted embedding bags (:func:`_pattern_products`), G^T's order from a stable sort of
    the index. Cost ~ Q*M*D whatever U, instead of Q*U*D (plus a [Q, U] fill and scatter)
    for ``(queries @ rows.t()).gather(1, index)``; same values up to summation order.
    """

    @staticmethod
    def forward(
        ctx, queries: torch.Tensor, rows: torch.Tensor, index: torch.Tensor,
        order: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_q, m = index.shape
        col = index.reshape(-1)
        scores = _sampled_products_(queries.new_empty(num_q * m), col, m, queries, rows)
        ctx.save_for_backward(queries, rows, col, order, offsets)
        return scores.view(num_q, m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        queries, rows, col, order, offsets = ctx.saved_tensors
        m = grad.shape[1]
        grad_q, grad_rows = _pattern_products(
            grad.contiguous().reshape(-1), col, m, rows, queries, order, offsets,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return grad_q, grad_rows, None, None, None


def _sampled_products_(
    out: torch.Tensor, col: torch.Tensor, m: int, queries: torch.Tensor, rows: torch.Tensor,
) -> torch.Tensor:
    """out[q*M + j] = <queries[q], rows[col[q*M + j]]> for the n = len(queries) queries of
    ``col`` [n*M], written into ``out`` [n*M] (a sampled dense-dense matmul on the CSR pattern
    of ``col``, row offsets 0, M, 2M, ...: no copy of its indices and values)."""
    n = queries.shape[0]
    crow = torch.arange(0, (n + 1) * m, m, device=col.device)
    # sampled_addmm reads its output even with beta=0 (NaN * 0 is NaN): zeroed first
    out.zero_()
    pattern = torch.sparse_csr_tensor(
        crow, col, out, size=(n, rows.shape[0]), check_invariants=False
    )
    torch.sparse.sampled_addmm(pattern, queries, rows.t(), beta=0.0, out=pattern)
    return out


def _pattern_products(
    weights: torch.Tensor, col: torch.Tensor, m: int, rows: torch.Tensor, queries: torch.Tensor,
    order: torch.Tensor | None, offsets: torch.Tensor | None, want_q: bool, want_rows: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """W @ rows [Q, D] and W^T @ queries [U, D] for the [Q, U] matrix W with ``weights``
    [Q*M] on the pattern of ``col`` (M entries per query row), each as a weighted-sum
    embedding bag: the first over each query's M ids, the second over each row's entries
    in the transposed order (:func:`_transpose_pattern`). embedding_bag's CPU kernel is
    ~2x faster than the sparse CSR matmul here; the sums run in the same order."""
    grad_q = grad_rows = None
    if want_q:
        grad_q = F.embedding_bag(
            col.view(-1, m), rows, per_sample_weights=weights.view(-1, m), mode="sum"
        )
    if want_rows:
        positions, queries_of, offsets = _transpose_pattern(col, m, rows.shape[0], order, offsets)
        grad_rows = F.embedding_bag(
            queries_of, queries, offsets, per_sample_weights=weights.index_select(0, positions),
            mode="sum", include_last_offset=True,
        )
    return grad_q, grad_rows


def _sampled_kernels_apply(queries: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether the sampled CPU kernels take these: CPU, float32/64 of one dtype, at least one
    query, and 0 < M <= U (they want no more columns than rows)."""
    return (
        queries.device.type == "cpu"
        and queries.shape[0] > 0
        and 0 < index.shape[1] <= rows.shape[0]
        and queries.dtype == rows.dtype
        and queries.dtype in (torch.float32, torch.float64)
    )


def shared_row_scores(
    queries: torch.Tensor, rows: torch.Tensor, index: torch.Tensor,
    order: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """[Q, D] queries, [U, D] rows, int64 [Q, M] index -> [Q, M] <queries[q], rows[index[q, m]]>.

    On CPU the sampled sparse kernels (:class:`_SampledScores`, which take the index's
    transpose ``order`` / ``offsets`` when the data path built it); elsewhere (or for an empty
    batch, or M > U, where the dense [Q, U] is the smaller) one [Q, U] matmul and a gather.
    """
    if _sampled_kernels_apply(queries, rows, index):
        return _SampledScores.apply(queries, rows, index, order, offsets)
    return (queries @ rows.t()).gather(1, index)


def negative_logits(
    queries: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_vectors: torch.Tensor | SharedRows,
    neg_ids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Logits [Q, M] of one group of negatives, -inf where a negative is the query's positive.

    Negatives are either shared, neg_vectors [M, D] with neg_ids [M], or per query,
    [Q, M, D] (or :class:`SharedRows`) with neg_ids [Q, M].
    """
    if isinstance(neg_vectors, SharedRows):
        logits = shared_row_scores(
            queries, neg_vectors.rows, neg_vectors.index, neg_vectors.order, neg_vectors.offsets
        ) / temperature
        hits = neg_ids == pos_ids.unsqueeze(1)
    elif neg_vectors.dim() == 2:
        logits = queries @ neg_vectors.t() / temperature
        hits = neg_ids.unsqueeze(0) == pos_ids.unsqueeze(1)
    else:
        logits = torch.einsum("qd,qmd->qm", queries, neg_vectors) / temperature
        hits = neg_ids == pos_ids.unsqueeze(1)
    return logits.masked_fill(hits, float("-inf"))


def sampled_softmax_loss(
    queries: torch.Tensor,
    pos_vectors: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_vectors: torch.Tensor | SharedRows | list,
    neg_ids: torch.Tensor | list,
    temperature: float,
    scale: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over [positive, negatives] per query, accidental hits masked.

    queries, pos_vectors [Q, D] (already normalised), pos_ids [Q]; negatives as in
    :func:`negative_logits`, or lists of such groups (their columns are concatenated, e.g.
    uniform plus in-batch negatives).
    ``scale`` None: the mean over queries; otherwise the sum times ``scale``.
    ``kept`` bool [Q] (None: all): only these queries' losses count (the mean is over them),
    and negatives of id < 0 (targets left out) are -inf.
    Returns (loss, pos_logits [Q], neg_logits [Q, M] with -inf at accidental hits).
    """
    pos_logits = (queries * pos_vectors).sum(-1) / temperature
    if not isinstance(neg_vectors, list):
        neg_vectors, neg_ids = [neg_vectors], [neg_ids]
    neg_logits = torch.cat(
        [
            negative_logits(queries, pos_ids, vectors, ids, temperature)
            for vectors, ids in zip(neg_vectors, neg_ids)
        ],
        dim=1,
    )
    if kept is not None:
        num_q = queries.shape[0]
        ids = torch.cat([i.expand(num_q, -1) if i.dim() == 1 else i for i in neg_ids], dim=1)
        neg_logits = neg_logits.masked_fill(ids < 0, float("-inf"))
    if queries.shape[0] == 0:
        # no query on this rank: a zero that still reaches the negatives, so that every rank
        # runs the same backward (the gathered in-batch positives' all-reduce included)
        return (queries.sum() + neg_logits.sum()) * 0.0, pos_logits, neg_logits
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    # the positive sits in column 0; log-softmax ignores -inf columns
    per_query = -torch.log_softmax(logits, dim=1)[:, 0]
    return _reduce(per_query, scale, kept), pos_logits, neg_logits


def _reduce(
    per_query: torch.Tensor, scale: torch.Tensor | None, kept: torch.Tensor | None
) -> torch.Tensor:
    """The loss from per-query losses [Q]: their mean (``scale`` None) or sum times ``scale``,
    over the ``kept`` queries only when given (the others add 0, and no gradient)."""
    if kept is None:
        return per_query.mean() if scale is None else per_query.sum() * scale
    per_query = torch.where(kept, per_query, torch.zeros_like(per_query))
    if scale is None:
        return per_query.sum() / kept.sum().clamp(min=1)
    return per_query.sum() * scale


def expected_counts(
    batch_ids: torch.Tensor, num_draws: int, population: int, ids: torch.Tensor,
    distinct: bool = False,
) -> torch.Tensor:
    """How often each of ``ids`` is expected among the negatives of a mixed draw: its count
    among ``batch_ids`` (the in-batch draws, each item drawn in proportion to its frequency in
    the batch) plus ``num_draws`` / ``population`` (uniform draws with replacement over
    ``population`` items; none when it is 0), or, with ``distinct`` (the draws' repeats
    removed, as the shared draw does), the chance 1 - (1 - 1/population)^num_draws that the
    item is among them. float64 [ids.shape]. Two binary searches in the sorted batch ids (no
    data-dependent size: nothing for a device to report to the host)."""
    ordered = torch.sort(batch_ids).values
    found = torch.searchsorted(ordered, ids, right=True) - torch.searchsorted(ordered, ids)
    rate = 0.0
    if population > 0:
        rate = (-math.expm1(num_draws * math.log1p(-1.0 / population)) if distinct
                else num_draws / population)
    return found.double() + rate


def corrected_softmax_loss(
    queries: torch.Tensor,
    pos_vectors: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_vectors: torch.Tensor,
    neg_ids: torch.Tensor,
    pos_log_q: torch.Tensor,
    neg_log_q: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled softmax with the sampling-probability (logQ) correction, over negatives shared
    by every query: logit = <query, item> / temperature - log q(item) for the positive (q:
    ``pos_log_q`` [Q]) and each negative (``neg_log_q`` [K]); a negative whose id is the
    query's positive (``neg_ids`` [K] == ``pos_ids`` [Q]) is left out (-inf), and so is every
    -inf of ``excluded`` [Q, K] (0 elsewhere; the queries' histories). ``kept`` bool [Q]: as
    in :func:`sampled_softmax_loss` (targets left out, negatives of id < 0 -inf).

    queries, pos_vectors [Q, D] normalised; neg_vectors [K, D] normalised. ``scale`` None: the
    mean over queries, else the sum times ``scale``. Returns (loss, pos_logits [Q],
    neg_logits [Q, K]), both corrected."""
    pos_logits = (queries * pos_vectors).sum(-1) / temperature - pos_log_q.to(queries.dtype)
    neg_logits = queries @ neg_vectors.t() / temperature - neg_log_q.to(queries.dtype)
    neg_logits = neg_logits.masked_fill(
        neg_ids.unsqueeze(0) == pos_ids.unsqueeze(1), float("-inf")
    )
    if excluded is not None:
        neg_logits = neg_logits + excluded.to(neg_logits.dtype)
    if kept is not None:
        neg_logits = neg_logits.masked_fill(neg_ids.unsqueeze(0) < 0, float("-inf"))
    if queries.shape[0] == 0:
        # no query on this rank: a zero that still reaches the negatives, so that every rank
        # runs the same backward (the gathered in-batch positives' all-reduce included)
        return (queries.sum() + neg_logits.sum()) * 0.0, pos_logits, neg_logits
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    per_query = torch.logsumexp(logits, dim=1) - pos_logits
    return _reduce(per_query, scale, kept), pos_logits, neg_logits


class _SampledLogSumExp(torch.autograd.Function):
    """lse[q] = log(exp(pos[q]) + sum_m exp(<queries[q], rows[index[q, m]]>)), the negatives
    with ``index[q, m] == pos_slot[q]`` (accidental hits) left out: the normaliser of the
    sampled softmax (``lse - pos`` is the loss of :func:`sampled_softmax_loss`).

    Forward: the sampled product (as :class:`_SampledScores`), the hits set to -inf, an
    in-place softmax over the negatives and their log-sum-exp, all in the [Q, M] buffer that
    backward keeps (the negatives' softmax). Over all queries at once: blocks of 128k
    logits sized for the core's L2 cost as much or more (measured on a 2-core CPU). Backward scales
    its [Q, D] sides by each query's share of the probability mass instead of touching [Q, M] again:
    grad_queries = c * (P @ rows) and grad_rows = P^T @ (c * queries), with c = grad_lse *
    exp(lse_neg - lse) (:func:`_pattern_products`). The unfused path (scores, division, id gather,
    comparison, masked fill, two concatenations, log-softmax, and the backward of each) streams
    [Q, M] tensors through memory about twenty times; here the forward's passes stay in cache and
    the backward reads the probabilities only inside the two products. Same values up to rounding.
    """

    @staticmethod
    def forward(
        ctx, queries: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, index: torch.Tensor,
        pos_slot: torch.Tensor, order: torch.Tensor | None, offsets: torch.Tensor | None,
    ) -> torch.Tensor:
        num_q, m = index.shape
        probs = queries.new_empty(num_q * m)
        lse = queries.new_empty(num_q)
        neg_mass = queries.new_empty(num_q)
        col = index.reshape(-1)
        logits = _sampled_products_(probs, col, m, queries, rows).view(num_q, m)
        hits = index == pos_slot.unsqueeze(1)
        logits.masked_fill_(hits, float("-inf"))
        lse_neg = softmax_lse_(logits)
        # a query whose every negative is its positive: no negative mass at all (its
        # softmax row is NaN); any other NaN stays visible
        empty = hits.all(dim=1)
        with allowed_sync(CPU_ONLY):
            any_empty = bool(empty.any())
        if any_empty:
            logits[empty] = 0.0
            lse_neg.masked_fill_(empty, float("-inf"))
        torch.logaddexp(lse_neg, pos, out=lse)
        torch.exp(lse_neg - lse, out=neg_mass)
        ctx.save_for_backward(queries, rows, pos, lse, neg_mass, col, probs, order, offsets)
        ctx.m = m
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):
        queries, rows, pos, lse, neg_mass, col, probs, order, offsets = ctx.saved_tensors
        m = ctx.m
        coef = (grad_lse * neg_mass).unsqueeze(1)  # [Q, 1]
        grad_q, grad_rows = _pattern_products(
            probs, col, m, rows, queries * coef, order, offsets,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        if grad_q is not None:
            grad_q.mul_(coef)
        grad_pos = None
        if ctx.needs_input_grad[2]:
            grad_pos = grad_lse * torch.exp(pos - lse)
        return grad_q, grad_rows, grad_pos, None, None, None, None


def _transpose_pattern(
    col: torch.Tensor, m: int, num_rows: int,
    order: torch.Tensor | None, offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, query of each, offsets [U + 1]): the CSR pattern of the [U, Q] transpose
    of a [Q, M] pattern with column ids ``col``, from the data path's (``order``,
    ``offsets``) when given, else sorted here (stably)."""
    if order is not None:
        return order[0], order[1], offsets
    # narrow keys sort several times faster (radix sort); ids are < U
    key_dtype = torch.int16 if num_rows <= 2**15 else torch.int32
    _, perm = torch.sort(col.to(key_dtype), stable=True)
    with allowed_sync(CPU_ONLY):
        counts = torch.bincount(col, minlength=num_rows)
    offsets = torch.zeros(num_rows + 1, dtype=col.dtype, device=col.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return perm, perm // m, offsets


def sampled_softmax_loss_shared(
    queries: torch.Tensor,
    pos_vectors: torch.Tensor,
    pos_ids: torch.Tensor,
    negatives: SharedRows,
    neg_ids: torch.Tensor,
    temperature: float,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sampled_softmax_loss` for one group of shared-row negatives on CPU, fused
    (:class:`_SampledLogSumExp`); ``neg_ids`` [U] are the rows' ids in ascending order.
    Returns (loss, pos_logits [Q]); the [Q, M] logits are not kept."""
    scaled = queries / temperature
    pos_logits = (scaled * pos_vectors).sum(-1)
    # the positive's row among the negatives' (-1 when none is): a hit is index == slot
    # (U >= M >= 1 here: see fused_sampled_loss_applies)
    slot = torch.searchsorted(neg_ids, pos_ids).clamp_(max=neg_ids.shape[0] - 1)
    found = neg_ids.index_select(0, slot) == pos_ids
    pos_slot = torch.where(found, slot, torch.full_like(slot, -1))
    lse = _SampledLogSumExp.apply(
        scaled, negatives.rows, pos_logits, negatives.index, pos_slot,
        negatives.order, negatives.offsets,
    )
    per_query = lse - pos_logits
    loss = per_query.mean() if scale is None else per_query.sum() * scale
    return loss, pos_logits


def fused_sampled_loss_applies(queries: torch.Tensor, negatives) -> bool:
    """Whether :func:`sampled_softmax_loss_shared` runs for this group of negatives: shared
    rows on CPU, float32/64, at least one query, 0 < M <= U (the sampled kernels)."""
    return isinstance(negatives, SharedRows) and _sampled_kernels_apply(
        queries, negatives.rows, negatives.index
    )


def negative_vectors(
    rows: torch.Tensor, index: torch.Tensor,
    order: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
) -> torch.Tensor | SharedRows:
    """Per-query negatives from the U distinct rows [U, D] (normalised) and index [Q, M]:
    a :class:`SharedRows` when the [Q, U] score matrix is smaller than the [Q, M, D]
    gathered vectors (same values, much cheaper on CPU), else rows[index] [Q, M, D].
    On CPU always shared rows: their sampled sparse kernels cost ~Q*M*D whatever U."""
    if rows.device.type == "cpu" or rows.shape[0] * 2 <= index.shape[1] * rows.shape[1]:
        return SharedRows(rows, index, order, offsets)
    return rows[index]


__all__ = [
    "SharedRows",
    "corrected_softmax_loss",
    "expected_counts",
    "fused_sampled_loss_applies",
    "negative_logits",
    "negative_vectors",
    "sampled_softmax_loss",
    "sampled_softmax_loss_shared",
    "shared_row_scores",
]
