"""Retrieval model: next-item sampled softmax in training, full-corpus ranking in evaluation.

Legend: B samples, H[b] history items, Q = sum(max(H-1, 0)) training queries of this rank,
M negatives per query, D hidden width (= item embedding dim), I items in the corpus, k top-k.

Training: the L2-normalised state of history item j's own token is the query for item j+1
(with interleaved actions, the item token, not the action token after it: the action token
carries only the action in its residual stream, so its state sees item j only through
attention and the model barely learned; the item token's state has item j in its residual).
Causally the query has seen items 0..j and actions 0..j-1, never item j+1. logits = cos(query, item) / temperature for the positive and its
negatives; negatives (``negative_sampling``) are ``num_negatives`` ids drawn uniformly from
[min_item_id, num_items) per query in the data path (hstu.data.negatives: they come with the
batch as one more key of its KeyedJaggedTensor, looked up with the rest), the other positives of the batch (in-batch), both
(mixed), or every item of the corpus (full_corpus: the exact softmax). A negative whose
id equals the query's positive id (an accidental hit) is masked out (-inf).

Evaluation: the query is the state of each sample's last history item token (the same kind
of position as in training; with actions, the trailing action token is not the query); every item in
[min_item_id, num_items) is scored, the sample's input history is excluded (-inf), and the
target's rank is counted over the whole corpus (ties pessimistic, see hstu.model.metrics).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from hstu.data.batch import Batch
from hstu.data.negatives import negatives_feature_name
from hstu.embeddings.collection import apply_misses
from hstu.model.encode import encode_batch
from hstu.model.hstu_block import HSTUBlock
from hstu.model.loss_scale import PendingScale
from hstu.model.jagged import index_within, lengths_to_offsets, segment_ids
from hstu.model.tensor_parallel import take_own_rows
from hstu.model.tokens import TokenBuilder
from hstu.sync_audit import allowed_sync


# the sampled-score kernels build CSR patterns; torch warns once that CSR is "beta"
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

NEGATIVE_SAMPLING = ("uniform", "in_batch", "mixed", "full_corpus")

# the sampled-score kernels and the fused sampled loss run on CPU tensors only (see
# shared_row_scores, fused_sampled_loss_applies): their host reads wait for no device
_CPU_ONLY = "a CPU-only kernel: the host reads its own memory, no device to wait for"


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
    crow: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[q*M + j] = <queries[q], rows[col[q*M + j]]> for the n = len(queries) queries of
    ``col`` [n*M], written into ``out`` [n*M] (a sampled dense-dense matmul on the CSR pattern
    of ``col``: no copy of its indices and values); ``crow`` may hold (at least) the pattern's
    n + 1 row offsets, 0, M, 2M, ..."""
    n = queries.shape[0]
    if crow is None:
        crow = torch.arange(0, (n + 1) * m, m, device=col.device)
    # sampled_addmm reads its output even with beta=0 (NaN * 0 is NaN): zeroed first
    out.zero_()
    pattern = torch.sparse_csr_tensor(
        crow[:n + 1], col, out, size=(n, rows.shape[0]), check_invariants=False
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


def shared_row_scores(
    queries: torch.Tensor, rows: torch.Tensor, index: torch.Tensor,
    order: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """[Q, D] queries, [U, D] rows, int64 [Q, M] index -> [Q, M] <queries[q], rows[index[q, m]]>.

    On CPU the sampled sparse kernels (:class:`_SampledScores`, which take the index's
    transpose ``order`` / ``offsets`` when the data path built it); elsewhere (or for an empty
    batch, or M > U, where the dense [Q, U] is the smaller) one [Q, U] matmul and a gather.
    """
    if (
        queries.device.type == "cpu"
        and queries.shape[0] > 0
        and 0 < index.shape[1] <= rows.shape[0]  # the sampled kernel wants M <= U columns
        and queries.dtype == rows.dtype
        and queries.dtype in (torch.float32, torch.float64)
    ):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over [positive, negatives] per query, accidental hits masked.

    queries, pos_vectors [Q, D] (already normalised), pos_ids [Q]; negatives as in
    :func:`negative_logits`, or lists of such groups (their columns are concatenated, e.g.
    uniform plus in-batch negatives).
    ``scale`` None: the mean over queries; otherwise the sum times ``scale``.
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
    if queries.shape[0] == 0:
        return queries.sum() * 0.0, pos_logits, neg_logits
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1)
    # the positive sits in column 0; log-softmax ignores -inf columns
    per_query = -torch.log_softmax(logits, dim=1)[:, 0]
    loss = per_query.mean() if scale is None else per_query.sum() * scale
    return loss, pos_logits, neg_logits


# elements of the [rows, M] logits _SampledLogSumExp handles at a time (512 KiB of float32
# logits plus 1 MiB of their int64 index): a block's sampled product, mask, softmax and
# maxima run in the core's own L2 instead of streaming [Q, M] through the shared cache
_SAMPLED_BLOCK_ELEMENTS = 1 << 17


class _SampledLogSumExp(torch.autograd.Function):
    """lse[q] = log(exp(pos[q]) + sum_m exp(<queries[q], rows[index[q, m]]>)), the negatives
    with ``index[q, m] == pos_slot[q]`` (accidental hits) left out: the normaliser of the
    sampled softmax (``lse - pos`` is the loss of :func:`sampled_softmax_loss`).

    Forward runs a block of queries at a time (``_SAMPLED_BLOCK_ELEMENTS``): the sampled
    product of the block (as :class:`_SampledScores`), the hits set to -inf, an in-place
    softmax over the negatives and their log-sum-exp; only the [Q, M] negatives' softmax
    is kept. Backward scales its [Q, D] sides by each query's share of the probability mass
    instead of touching [Q, M] again: grad_queries = c * (P @ rows) and grad_rows =
    P^T @ (c * queries), with c = grad_lse * exp(lse_neg - lse) (:func:`_pattern_products`).
    The unfused path (scores, division, id gather, comparison, masked fill, two
    concatenations, log-softmax, and the backward of each) streams [Q, M] tensors through
    memory about twenty times; here the forward's passes stay in cache and the backward
    reads the probabilities only inside the two products. Same values up to rounding.
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
        block = max(1, _SAMPLED_BLOCK_ELEMENTS // m)
        crow = torch.arange(0, (min(block, num_q) + 1) * m, m, device=index.device)
        for s in range(0, num_q, block):
            e = min(num_q, s + block)
            logits = _sampled_products_(
                probs[s * m:e * m], col[s * m:e * m], m, queries[s:e], rows, crow
            ).view(e - s, m)
            hits = index[s:e] == pos_slot[s:e].unsqueeze(1)
            logits.masked_fill_(hits, float("-inf"))
            lse_neg = _softmax_lse_(logits)
            # a query whose every negative is its positive: no negative mass at all (its
            # softmax row is NaN); any other NaN stays visible
            empty = hits.all(dim=1)
            with allowed_sync(_CPU_ONLY):
                any_empty = bool(empty.any())
            if any_empty:
                logits[empty] = 0.0
                lse_neg.masked_fill_(empty, float("-inf"))
            torch.logaddexp(lse_neg, pos[s:e], out=lse[s:e])
            torch.exp(lse_neg - lse[s:e], out=neg_mass[s:e])
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
    with allowed_sync(_CPU_ONLY):
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
    pos_slot = torch.where(neg_ids.index_select(0, slot) == pos_ids, slot, torch.full_like(slot, -1))
    lse = _SampledLogSumExp.apply(
        scaled, negatives.rows, pos_logits, negatives.index, pos_slot, negatives.order, negatives.offsets
    )
    per_query = lse - pos_logits
    loss = per_query.mean() if scale is None else per_query.sum() * scale
    return loss, pos_logits


def fused_sampled_loss_applies(queries: torch.Tensor, negatives) -> bool:
    """Whether :func:`sampled_softmax_loss_shared` runs for this group of negatives: shared
    rows on CPU, float32/64, at least one query, 0 < M <= U (the sampled kernels)."""
    return (
        isinstance(negatives, SharedRows)
        and queries.device.type == "cpu"
        and queries.shape[0] > 0
        and 0 < negatives.index.shape[1] <= negatives.rows.shape[0]
        and queries.dtype == negatives.rows.dtype
        and queries.dtype in (torch.float32, torch.float64)
    )


def _softmax_lse_(logits: torch.Tensor) -> torch.Tensor:
    """Rows of ``logits`` [r, I] become their softmax, in place; returns their log-sum-exp [r]
    as max - log(max prob) (the largest probability is 1 / sum exp(logit - max) >= 1 / I:
    never underflows)."""
    top = logits.amax(dim=1)
    torch.softmax(logits, dim=1, out=logits)
    return top - logits.amax(dim=1).log()


def _claim_buffers(ctx) -> None:
    """The full-corpus losses' backward turns its saved buffer into the gradient in place."""
    if ctx.used:
        raise RuntimeError("the full-corpus softmax loss keeps its buffers for one backward only")
    ctx.used = True


class _FullSoftmaxLoss(torch.autograd.Function):
    """Sum over queries of the cross-entropy of ``logits = queries @ corpus.T`` at ``target``.

    The [Q, I] logits are produced and turned into probabilities a block of queries at a
    time (the block stays in cache), and only the probabilities are kept for backward, where
    they become ``P - onehot`` in place and feed the two matmuls of the gradient (scaled on
    their [Q, D] sides). The buffer is reused from step to step (``_SPARE``). Standard
    autograd (``F.cross_entropy(q @ c.T)``) materialises the logits, the log-softmax, its
    gradient and a scattered one-hot gradient: four [Q, I] matrices and about twice the
    memory passes. Same values up to summation order. Backward runs once (in place).
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, corpus: torch.Tensor, target: torch.Tensor):
        num_q, num_i = queries.shape[0], corpus.shape[0]
        probs = _take_buffer(num_q * num_i, queries).view(num_q, num_i)
        losses = queries.new_empty(num_q)
        pos = queries.new_empty(num_q)
        block = _block_rows(num_i)
        corpus_t = corpus.t()
        for s in range(0, num_q, block):
            e = min(num_q, s + block)
            logits = torch.mm(queries[s:e], corpus_t, out=probs[s:e])
            torch.gather(logits, 1, target[s:e].unsqueeze(1), out=pos[s:e].unsqueeze(1))
            # softmax in place while the block is in cache
            torch.sub(_softmax_lse_(logits), pos[s:e], out=losses[s:e])
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(queries, corpus, target, probs)
        else:
            _give_back(probs)
        ctx.mark_non_differentiable(pos)
        ctx.used = False
        return losses.sum(), pos

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pos: torch.Tensor):
        _claim_buffers(ctx)
        queries, corpus, target, probs = ctx.saved_tensors
        num_q, num_i = probs.shape
        grad_q = torch.empty_like(queries)
        grad_c = torch.zeros_like(corpus)
        block = _block_rows(num_i)
        rows = torch.arange(num_q, device=probs.device)
        # a fill on the device (not a copy from the host: a blocking copy on CUDA)
        probs.index_put_((rows, target), probs.new_full((), -1.0), accumulate=True)
        # the scalar gradient scales the [Q, D] sides, not the [Q, I] matrix
        scaled_q = queries * grad_loss
        for s in range(0, num_q, block):
            e = min(num_q, s + block)
            g = probs[s:e]
            torch.mm(g, corpus, out=grad_q[s:e])
            grad_c.addmm_(g.t(), scaled_q[s:e])
        grad_q.mul_(grad_loss)
        _give_back(probs)
        return grad_q, grad_c, None


# elements of the [block, I] logits handled at a time by _FullSoftmaxLoss (1 MiB in float32:
# a block stays in a core's L2 between its matmul and its softmax), but never fewer than
# _FULL_SOFTMAX_MIN_ROWS queries: every block reads the whole corpus and updates its whole
# gradient, so a large corpus needs wide blocks (100k items: 2-row blocks were 15x slower)
_FULL_SOFTMAX_BLOCK_ELEMENTS = 1 << 18
_FULL_SOFTMAX_MIN_ROWS = 64


def _block_rows(num_items: int) -> int:
    return max(_FULL_SOFTMAX_MIN_ROWS, _FULL_SOFTMAX_BLOCK_ELEMENTS // max(1, num_items))


# One spare [Q, I] buffer per device and dtype, handed from a backward to the next forward:
# a fresh buffer of this size is a new mmap every step, and touching its pages first costs
# as much as the softmax itself (~90 ms for 270 MB on the CPU machine). A forward whose
# backward never runs simply does not give its buffer back.
_SPARE: dict = {}


def _take_buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype)
    spare = _SPARE.pop(key, None)
    if spare is not None and spare.numel() >= numel:
        return spare[:numel]
    return like.new_empty(numel)


def _give_back(buffer: torch.Tensor) -> None:
    # a view's _base is its root storage tensor (torch collapses chains of views)
    base = buffer if buffer._base is None else buffer._base
    key = (base.device, base.dtype)
    held = _SPARE.get(key)
    if held is None or held.numel() < base.numel():
        _SPARE[key] = base.view(-1)


class _FullSoftmaxLossBF16(torch.autograd.Function):
    """:class:`_FullSoftmaxLoss` with its three [Q, I] matmuls in bfloat16 (float32
    accumulation; 4-5x the float32 matmul rate on CPUs with AVX512-BF16 or AMX, and on GPUs).

    What keeps it accurate:
    - the target logit is the exact float32 dot product, used both as the loss's positive
      term and as the target's own column in the softmax (so a well-predicted query's tiny
      loss is not a rounding error);
    - the bfloat16 matmul computes ``logit - shift`` with ``shift`` the target logit rounded
      to bfloat16 (one more column: ``[q, -shift] . [c, 1]``), so the logits that matter (near
      the target's and above) come out near 0, where bfloat16's relative rounding is small in
      absolute terms; the softmax of a block runs in float32;
    - backward's ``P - onehot`` is formed in float32 before rounding, so a well-predicted
      query's small gradient is not the difference of two rounded numbers.
    What is rounded: the queries and items to 8 mantissa bits in the matmuls (logit error
    ~1e-3 x |logit| / sqrt(D)), the kept probabilities and the two gradients' outputs.
    """

    @staticmethod
    def forward(ctx, queries: torch.Tensor, corpus: torch.Tensor, target: torch.Tensor):
        num_q, dim = queries.shape
        num_i = corpus.shape[0]
        bf16 = torch.bfloat16
        with torch.no_grad():
            pos = (queries * corpus.index_select(0, target)).sum(1)
            shift = pos.to(bf16)
            q_aug = queries.new_empty(num_q, dim + 1, dtype=bf16)
            q_aug[:, :dim] = queries
            torch.neg(shift, out=q_aug[:, dim])
            c_aug = corpus.new_empty(num_i, dim + 1, dtype=bf16)
            c_aug[:, :dim] = corpus
            c_aug[:, dim] = 1.0
        grads = _take_buffer(num_q * num_i, q_aug).view(num_q, num_i)
        block = _block_rows(num_i)
        scratch = queries.new_empty(min(block, num_q), num_i)
        losses = queries.new_empty(num_q)
        shift_err = shift.float() - pos  # the loss is lse(logit - shift) + shift - pos
        c_aug_t = c_aug.t()
        keep = any(ctx.needs_input_grad)
        minus_one = queries.new_full((), -1.0)  # a fill on the device, not a host copy
        for s in range(0, num_q, block):
            e = min(num_q, s + block)
            out = torch.mm(q_aug[s:e], c_aug_t, out=grads[s:e])
            probs = scratch[: e - s]
            probs.copy_(out)
            # the target's own column gets its exact shifted logit (pos - shift)
            rows = torch.arange(e - s, device=probs.device)
            probs.index_put_((rows, target[s:e]), shift_err[s:e].neg())
            torch.add(_softmax_lse_(probs), shift_err[s:e], out=losses[s:e])
            if keep:  # P - onehot in float32, then rounded once
                probs.index_put_((rows, target[s:e]), minus_one, accumulate=True)
                out.copy_(probs)
        if keep:
            ctx.save_for_backward(q_aug, c_aug, grads)
            ctx.dim = dim
        else:
            _give_back(grads)
        ctx.mark_non_differentiable(pos)
        ctx.used = False
        return losses.sum(), pos

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_pos: torch.Tensor):
        _claim_buffers(ctx)
        q_aug, c_aug, grads = ctx.saved_tensors
        dim = ctx.dim
        grad_q = torch.mm(grads, c_aug[:, :dim]).float().mul_(grad_loss)
        grad_c = torch.mm(grads.t(), q_aug[:, :dim]).float().mul_(grad_loss)
        _give_back(grads)
        return grad_q, grad_c, None


def full_softmax_loss(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    target: torch.Tensor,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over queries of -log softmax(queries @ corpus.T)[q, target[q]], the target logits
    [Q] (no gradient)); queries [Q, D], corpus [I, D] in one floating dtype.
    ``matmul_dtype=torch.bfloat16`` runs the [Q, I] matmuls in bfloat16 on float32 inputs
    (:class:`_FullSoftmaxLossBF16`); None: in the inputs' dtype, exact up to summation order."""
    if queries.dtype != corpus.dtype:
        corpus = corpus.to(queries.dtype)
    args = (queries.contiguous(), corpus.contiguous(), target.contiguous())
    if matmul_dtype is None or matmul_dtype == queries.dtype:
        return _FullSoftmaxLoss.apply(*args)
    if matmul_dtype != torch.bfloat16 or queries.dtype != torch.float32:
        raise ValueError(
            f"full-corpus softmax: a {matmul_dtype} matmul on {queries.dtype} inputs is not "
            "supported (bfloat16 on float32 only)"
        )
    return _FullSoftmaxLossBF16.apply(*args)


@dataclass
class RetrievalEval:
    """top_ids int64 [B, k], top_scores [B, k] (cosine), target_ranks float [B] (inf: unranked)."""

    top_ids: torch.Tensor
    top_scores: torch.Tensor
    target_ranks: torch.Tensor


class RetrievalModel(nn.Module):
    """The dense part: forward(batch, embeddings) -> (loss, (pos_logits [Q], neg_logits [Q, M]));
    see the module docstring. ``embeddings``: the sparse module's output for the batch,
    including the negatives key (:mod:`hstu.data.negatives`) for uniform, mixed and
    full-corpus sampling.

    In training the loss is this rank's share of the global-batch mean over queries
    (:mod:`hstu.model.loss_scale`).

    Args:
        token_builder, block: as for ranking (the item feature must not be projected: item
            embeddings and queries share the space, so item dim must equal D).
        num_items: ids are in [0, num_items).
        num_negatives: uniform negatives per query (-1: none, in-batch under "uniform").
        negative_sampling: "uniform" (num_negatives ids per query drawn uniformly from the
            corpus; -1 means in-batch), "in_batch" (the other positives of this rank's
            batch), "mixed" (uniform plus in-batch) or "full_corpus" (every item: an exact
            softmax over the corpus).
        temperature: softmax temperature on cosine similarities.
        full_corpus_matmul_dtype: "float32" or "bfloat16": the full-corpus training loss's
            [Q, I] matmuls (see :func:`full_softmax_loss`).
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
    ) -> None:
        super().__init__()
        if token_builder.item_feature_name in token_builder.projections:
            raise ValueError("retrieval needs the item embedding dim to equal hidden_size")
        self.token_builder = token_builder
        self.block = block
        self.num_items = num_items
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"negative_sampling {negative_sampling!r} is not one of {NEGATIVE_SAMPLING}")
        self.num_negatives = num_negatives
        self.negative_sampling = negative_sampling
        self.temperature = temperature
        if full_corpus_matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"full_corpus_matmul_dtype {full_corpus_matmul_dtype!r} is not 'float32' or 'bfloat16'"
            )
        self.full_corpus_matmul_dtype = getattr(torch, full_corpus_matmul_dtype)
        self.l2_norm_eps = l2_norm_eps
        self.min_item_id = min_item_id
        self.max_item_seqlen = max_item_seqlen
        self.tp_group = tp_group
        self.negatives_feature = negatives_feature_name(token_builder.item_feature_name)

    @property
    def uses_negatives_key(self) -> bool:
        """Whether training batches carry the negatives (or corpus) key."""
        return self.negative_sampling == "full_corpus" or (
            self.negative_sampling in ("uniform", "mixed") and self.num_negatives > 0
        )

    # ------------------------------------------------------------------------ helpers

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), p=2.0, dim=-1, eps=self.l2_norm_eps)

    def _states(self, batch: Batch, embeddings: dict):
        return encode_batch(
            batch, embeddings, self.token_builder, self.block,
            self.max_item_seqlen, self.tp_group,
        )

    # ------------------------------------------------------------------------ training

    def forward(
        self, batch: Batch, embeddings: dict
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # this rank's query count (sum of max(H - 1, 0)), summed over the world while the
        # block runs; the same number as Q below
        pending = PendingScale((batch.history_lengths() - 1).clamp(min=0).sum(), self.training)
        own, _, layout, tokens, states = self._states(batch, embeddings)
        history_states = take_own_rows(
            states.index_select(0, tokens.history_query_rows), layout.history, self.tp_group
        )
        # (index_select rather than x[rows] on these [rows, D] / [Q, M] gathers: several times
        # faster on CPU, forward and backward; the same values)
        # queries: history items j < H - 1 (position j predicts item j+1), listed per sample
        # in order, Q of them (a count from the host: no nonzero of a mask)
        hist = own.history_lengths
        num_q = own.sizes.num_queries
        has_next = (hist - 1).clamp(min=0)
        q_seg = segment_ids(has_next, num_q)
        q_idx = index_within(has_next, num_q)
        query_rows = lengths_to_offsets(hist)[:-1][q_seg] + q_idx  # rows of [sum(H)]
        item_starts = lengths_to_offsets(own.item_lengths)[:-1]
        next_rows = item_starts[q_seg] + q_idx + 1  # item j+1's row in the item feature

        queries = self.normalise(history_states.index_select(0, query_rows))
        pos_ids = own.item_ids[next_rows]
        pos_vectors = self.normalise(own.item_values.index_select(0, next_rows))
        scale = pending.wait()
        if self.uses_negatives_key and self.negatives_feature not in embeddings:
            raise ValueError(
                f"negative_sampling={self.negative_sampling!r} needs the batch to carry the "
                f"{self.negatives_feature!r} key (hstu.data.negatives.NegativeSampler on the loader)"
            )
        if self.negative_sampling == "full_corpus":
            corpus = self.normalise(
                apply_misses(embeddings, batch.lookup_misses)[self.negatives_feature].values()
            )
            return self.full_corpus_loss(queries, pos_ids, corpus, scale)
        neg_vectors, neg_ids = [], []
        if self.negative_sampling in ("uniform", "mixed") and self.num_negatives > 0:
            if batch.negative_index is None:
                raise ValueError("uniform negatives need Batch.negative_index (hstu.data.negatives)")
            uniq = batch.features[self.negatives_feature].values().to(queries.device)
            index = batch.negative_index.to(queries.device)
            rows = self.normalise(
                apply_misses(embeddings, batch.lookup_misses)[self.negatives_feature].values()
            )
            shared = self.negative_vectors(rows, index, batch.negative_order, batch.negative_offsets)
            fused = (
                self.negative_sampling == "uniform"
                and self.training
                and torch.is_grad_enabled()
                and fused_sampled_loss_applies(queries, shared)
            )
            if fused:
                with allowed_sync(_CPU_ONLY):  # the data path's ids are ascending
                    fused = bool((uniq[1:] > uniq[:-1]).all())
            if fused:
                loss, pos_logits = sampled_softmax_loss_shared(
                    queries, pos_vectors, pos_ids, shared, uniq, self.temperature, scale
                )
                # nothing reads a training step's [Q, M] logits: not kept
                return loss, (pos_logits.detach(), None)
            neg_ids.append(uniq.index_select(0, index.reshape(-1)).view(index.shape))
            neg_vectors.append(shared)
        if self.negative_sampling in ("in_batch", "mixed") or (
            self.negative_sampling == "uniform" and self.num_negatives == -1
        ):
            neg_ids.append(pos_ids)
            neg_vectors.append(pos_vectors)
        loss, pos_logits, neg_logits = sampled_softmax_loss(
            queries, pos_vectors, pos_ids, neg_vectors, neg_ids, self.temperature, scale
        )
        return loss, (pos_logits.detach(), neg_logits.detach())

    def full_corpus_loss(
        self,
        queries: torch.Tensor,
        pos_ids: torch.Tensor,
        corpus: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Exact softmax over every item [min_item_id, num_items) (``corpus`` [I, D], normalised,
        row i = item min_item_id + i): one [Q, I] logit matrix and a cross-entropy on the
        positive's column (each id appears once, so nothing needs masking). Same loss as
        :func:`sampled_softmax_loss` with the corpus as negatives."""
        # the temperature scales the [Q, D] queries, not the [Q, I] logits (same values, less work)
        scaled = queries / self.temperature
        target = pos_ids - self.min_item_id
        if queries.shape[0] == 0:
            logits = scaled @ corpus.t()
            return logits.sum() * 0.0, (logits.new_zeros(0), logits)
        total, pos_logits = full_softmax_loss(scaled, corpus, target, self.full_corpus_matmul_dtype)
        loss = total / queries.shape[0] if scale is None else total * scale
        if self.training:
            # nothing reads the [Q, I] logits of a training step: not built again
            return loss, (pos_logits, None)
        with torch.no_grad():
            neg_logits = (scaled @ corpus.t()).scatter_(1, target.unsqueeze(1), float("-inf"))
        return loss, (pos_logits, neg_logits)

    @staticmethod
    def negative_vectors(
        rows: torch.Tensor, index: torch.Tensor,
        order: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
    ):
        """Per-query negatives from the U distinct rows [U, D] (normalised) and index [Q, M]:
        a :class:`SharedRows` when the [Q, U] score matrix is smaller than the [Q, M, D]
        gathered vectors (same values, much cheaper on CPU), else rows[index] [Q, M, D].
        On CPU always shared rows: their sampled sparse kernels cost ~Q*M*D whatever U."""
        if rows.device.type == "cpu" or rows.shape[0] * 2 <= index.shape[1] * rows.shape[1]:
            return SharedRows(rows, index, order, offsets)
        return rows[index]

    # ---------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def last_queries(self, batch: Batch, embeddings: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised query of each own sample's last history item token [B, D], and the own history
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
        last = states[rows]  # [B_all, D]
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
        ``corpus_vectors``); scores are computed ``chunk_size`` items at a time so memory is
        B x chunk. A target's score is read from the same score matrix as every other item's
        (ties are exact); with several chunks, the chunks holding targets are scored twice.
        """
        queries, history_ids, history_seg = self.last_queries(batch, embeddings)
        bsz = queries.shape[0]
        targets = (
            batch.labels if batch.labels is not None else torch.full((bsz,), -1, dtype=torch.int64)
        )
        targets = targets.to(queries.device)
        in_corpus = (targets >= self.min_item_id) & (targets < self.num_items)
        target_in_history = torch.zeros(bsz, dtype=torch.bool, device=queries.device)
        target_in_history[history_seg[history_ids == targets[history_seg]]] = True
        unranked = ~in_corpus | target_in_history
        rows = torch.arange(bsz, device=queries.device)
        chunks = [
            (start, min(start + chunk_size, self.num_items))
            for start in range(0, self.num_items, chunk_size)
        ]

        def chunk_scores(start: int, end: int) -> torch.Tensor:
            """[B, end - start] scores, -inf below min_item_id and on the history."""
            scores = queries @ corpus[start:end].t()
            if start < self.min_item_id:
                scores[:, : min(self.min_item_id, end) - start] = float("-inf")
            hit = (history_ids >= start) & (history_ids < end)
            scores[history_seg[hit], history_ids[hit] - start] = float("-inf")
            return scores

        # The target's score is its column of the very matmul the other items' scores come
        # from: an elementwise product summed rounds differently, which would miscount ties
        # and near ties. With several chunks, a first pass gathers the targets' columns.
        target_scores = queries.new_full((bsz,), float("-inf"))

        def take_target_scores(scores: torch.Tensor, start: int, end: int) -> None:
            own = ~unranked & (targets >= start) & (targets < end)
            target_scores[own] = scores[rows[own], targets[own] - start]

        if len(chunks) > 1:
            for start, end in chunks:
                if (~unranked & (targets >= start) & (targets < end)).any():
                    take_target_scores(chunk_scores(start, end), start, end)

        k = min(top_k, self.num_items)
        top_scores = queries.new_full((bsz, 0), float("-inf"))
        top_ids = torch.zeros((bsz, 0), dtype=torch.int64, device=queries.device)
        num_ahead = torch.zeros(bsz, dtype=torch.int64, device=queries.device)
        for start, end in chunks:
            scores = chunk_scores(start, end)  # [B, chunk]
            if len(chunks) == 1:
                take_target_scores(scores, start, end)
            is_target = (targets >= start) & (targets < end)
            ahead = scores >= target_scores.unsqueeze(1)
            # the target never counts against itself
            ahead[rows[is_target], targets[is_target] - start] = False
            num_ahead += ahead.sum(1)
            ids = torch.arange(start, end, device=queries.device).expand(bsz, -1)
            merged_scores = torch.cat([top_scores, scores], 1)
            merged_ids = torch.cat([top_ids, ids], 1)
            top_scores, pick = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            top_ids = merged_ids.gather(1, pick)
        ranks = (num_ahead + 1).float().masked_fill(unranked, float("inf"))
        return RetrievalEval(top_ids=top_ids, top_scores=top_scores, target_ranks=ranks)


__all__ = ["NEGATIVE_SAMPLING", "RetrievalEval", "RetrievalModel", "SharedRows", "sampled_softmax_loss"]
