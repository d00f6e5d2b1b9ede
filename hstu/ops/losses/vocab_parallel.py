"""The exact full-corpus softmax with the corpus split over ranks (vocabulary-parallel).

Legend: W ranks, Q_r queries of rank r, N = sum(Q_r) queries of the world, I_r corpus rows held
by rank r (columns [lo_r, lo_r + I_r) of the corpus; sum(I_r) = I), D width.

Each rank scores every rank's queries (all-gathered, with their targets and histories) against
the rows of its own shard only, and the softmax is reduced over the ranks: the row maxima (an
all-reduce of max), the sums of exp (of sum) and the target logits (of sum, from the one rank
that holds each target). No rank ever holds the whole corpus or sends its ids anywhere: the
[N, I_r] block is what a rank computes, and it exchanges [N] vectors and the [N, D] query
gradient (the pattern of megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy``,
written here for jagged, uneven query counts and the history exclusion).

Gradients, for the averaging the trainer applies afterwards (hstu.model.loss_scale): the dense
gradient of a rank's own queries is ``scale * d loss_n / d q_n`` (every rank's partial over its
columns, summed by the gather's backward), and the shard's rows get the gradient of every
query of the world times ``scale * corpus_grad_factor`` (``1 / W`` where nothing after the
loss averages the table's gradient over the world, as the input distribution's backward
otherwise does). The loss value is this rank's share, ``scale * sum of its own queries'
losses``, as the other full-corpus losses report it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.ops.gather import gather_rows
from hstu.ops.losses.full_corpus import HistoryWindow


class _ShardSoftmax(torch.autograd.Function):
    """Per-query cross-entropy [N] over the world's corpus, from this rank's [N, I_r] block."""

    @staticmethod
    def forward(ctx, queries: torch.Tensor, shard: torch.Tensor, target: torch.Tensor, lo: int,
                window: HistoryWindow | None, group: ProcessGroup | None,
                matmul_dtype: torch.dtype | None = None):
        num_q, num_i = queries.shape[0], shard.shape[0]
        low = matmul_dtype is not None and matmul_dtype != queries.dtype
        if low:  # the [N, I_r] products rounded, accumulated in float32
            logits = (queries.to(matmul_dtype) @ shard.to(matmul_dtype).t()).to(queries.dtype)
        else:
            logits = queries @ shard.t()  # [N, I_r]
        col = target - lo
        held = (col >= 0) & (col < num_i)
        # -1: a target another rank holds (never one of this rank's columns)
        col = torch.where(held, col, torch.full_like(col, -1))
        safe = col.clamp(min=0)
        if low and num_i > 0:  # the target's own logit exact (float32), as in one process
            rows = torch.arange(num_q, device=logits.device)
            exact = (queries * shard.index_select(0, safe)).sum(1)
            logits[rows, safe] = torch.where(held, exact, logits[rows, safe])
        if window is not None:
            window.shifted(lo).mask_(logits, 0, col)
        if num_i > 0:
            top = logits.amax(1)
            target_logit = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            pos = torch.where(held, target_logit, torch.zeros_like(top))
        else:
            top = queries.new_full((num_q,), float("-inf"))
            pos = queries.new_zeros(num_q)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        # each target is held by one rank and never masked: top is finite
        logits.sub_(top.unsqueeze(1)).exp_()
        reduced = torch.stack([logits.sum(1), pos])
        dist.all_reduce(reduced, group=group)
        total, pos = reduced[0], reduced[1]
        losses = total.log() + top - pos
        logits.div_(total.unsqueeze(1))  # the probabilities of the own columns
        ctx.save_for_backward(queries, shard, safe, held, logits)
        ctx.matmul_dtype = matmul_dtype if low else None
        ctx.mark_non_differentiable(pos)
        return losses, pos

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_pos: torch.Tensor):
        queries, shard, local_col, held, probs = ctx.saved_tensors
        rows = torch.arange(probs.shape[0], device=probs.device)
        if probs.shape[1] > 0:
            probs.index_put_((rows, local_col), -held.to(probs.dtype), accumulate=True)
        probs.mul_(grad.unsqueeze(1))
        low = ctx.matmul_dtype
        if low is not None:
            p, s, q = probs.to(low), shard.to(low), queries.to(low)
            grads = (p @ s).to(queries.dtype), (p.t() @ q).to(shard.dtype)
        else:
            grads = probs @ shard, probs.t() @ queries
        return (*grads, None, None, None, None, None)


def local_shard_rows(sharded: nn.Module, table: str, feature: str) -> tuple[torch.Tensor, int]:
    """(this rank's rows of ``table`` [I_r, D] as a differentiable lookup, the id of its first
    row) from a TorchRec ``ShardedEmbeddingCollection`` (or the DistributedModelParallel around
    it), row-wise or table-wise (a rank without rows of it: [0, D]). The rows come from the
    rank's own lookup module, called with the local row offsets: no input distribution, no
    output distribution, no collective; backward hands their gradient to that module (FBGEMM's
    fused optimizer then updates them), with no mean over the ranks (hence
    ``corpus_grad_factor``). ``feature``: one of the table's features. The shard's layout and
    the lookup's input are read once per collection (cached on it): sharding fixes them."""
    ec = getattr(sharded, "module", sharded)
    cache = ec.__dict__.setdefault("_hstu_local_shard_rows", {})
    plan = cache.get((table, feature))
    if plan is None:  # the layout is fixed once sharded: read it (and build the input) once
        plan = cache[(table, feature)] = _shard_plan(ec, table, feature)
    lookup, kjt, first, rows, empty = plan
    if lookup is None:
        return empty, first
    return lookup(kjt).view(rows, empty.shape[1]), first


def _shard_plan(ec: nn.Module, table: str, feature: str):
    """(lookup module or None, its input, first row id, rows, an empty [0, D] on the device)."""
    state = ec.state_dict()
    weight = state[f"embeddings.{table}.weight"]
    shards = weight.local_shards()
    dim = weight.size(1)
    device = next(
        (
            sh.tensor.device
            for v in state.values() if hasattr(v, "local_shards")
            for sh in v.local_shards()
        ),
        torch.device("cpu"),
    )
    empty = torch.empty(0, dim, device=device)
    if not shards:
        return None, None, 0, 0, empty
    if len(shards) > 1 or shards[0].metadata.shard_sizes[1] != dim:
        raise ValueError(
            f"table {table!r}: full-corpus scoring over shards needs whole rows on each rank "
            "(row_wise or table_wise), not column-wise shards"
        )
    meta = shards[0].metadata
    first, rows = int(meta.shard_offsets[0]), int(meta.shard_sizes[0])
    for st, lookup in zip(ec._sharding_type_to_sharding, ec._lookups, strict=True):
        names = ec._sharding_type_to_sharding[st].feature_names()
        if feature not in names:
            continue
        per_key = [rows if n == feature else 0 for n in names]  # host numbers: no read back
        lengths = torch.zeros(len(names), dtype=torch.int64, device=device)
        lengths[names.index(feature)] = rows  # a fill on the device, not a copy from the host
        kjt = KeyedJaggedTensor(
            keys=names, values=torch.arange(rows, device=device), lengths=lengths, stride=1,
            length_per_key=per_key,
            offset_per_key=[sum(per_key[:i]) for i in range(len(names) + 1)],
        )
        return lookup, kjt, first, rows, empty
    raise ValueError(f"feature {feature!r} is not a feature of a sharded table on this rank")


def vocab_parallel_loss(
    queries: torch.Tensor,
    pos_ids: torch.Tensor,
    shard: torch.Tensor,
    shard_start: int,
    *,
    counts: list[int],
    temperature: float,
    scale: torch.Tensor,
    window: HistoryWindow | None = None,
    id_counts: list[int] | None = None,
    corpus_grad_factor: float = 1.0,
    group: ProcessGroup | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's loss, the target logits of its own queries [Q_r], no gradient).

    ``queries`` [Q_r, D] normalised; ``pos_ids`` int64 [Q_r] item ids; ``shard`` [I_r, D]
    normalised rows of item ids [shard_start, shard_start + I_r) (zero rows where the rank
    holds none); ``counts``: every rank's Q_r (:class:`hstu.ops.gather.PendingCounts`);
    ``window``: the own queries' histories (item ids), with ``id_counts`` every rank's number
    of window ids (its ``width`` must cover every rank's histories: the dataset's longest);
    ``scale``: hstu.model.loss_scale's factor. ``group``: the ranks that split the corpus (None: the
    world, the group the gathers use). ``matmul_dtype`` (RetrievalArgs.full_corpus_matmul_dtype):
    bfloat16 runs the [N, I_r] products of forward and backward in bfloat16 (float32 accumulation;
    each target's own logit stays the exact float32 dot product), None or the queries' dtype in that
    dtype."""
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    all_q = gather_rows(queries / temperature, counts)
    all_pos = gather_rows(pos_ids, counts)
    all_window = None
    if window is not None:
        assert id_counts is not None, "a history window needs every rank's id count"
        shift = sum(id_counts[:rank])
        all_window = HistoryWindow(
            gather_rows(window.ids, id_counts), gather_rows(window.starts + shift, counts),
            gather_rows(window.lengths, counts), window.width,
        )
    losses, pos = _ShardSoftmax.apply(
        all_q, _scaled_grad(shard, corpus_grad_factor), all_pos, shard_start, all_window, group,
        matmul_dtype,
    )
    own = losses[start : start + counts[rank]]
    # value: this rank's share (scale * its own queries' losses); gradient: every query's, so
    # that the shard's rows learn from the whole world's queries
    graph = losses.sum() * scale
    reported = own.detach().sum() * scale
    loss = graph + (reported - graph).detach()
    return loss, pos[start : start + counts[rank]]


class _BatchRowsToShard(torch.autograd.Function):
    """Forward: the batch's looked-up item rows [n, D] unchanged (detached from their lookup);
    backward: their gradient, every rank's gathered, added into this rank's shard rows
    [I_r, D] (the rows whose ids it holds), times ``factor``. So one lookup call of the item
    table per step carries the whole step's gradient of its rows (the batch's and the
    corpus's), as TorchRec's single lookup of batch and corpus did: a fused optimizer applies
    it once (row-wise Adagrad's accumulator, a step count), not once per call."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, shard: torch.Tensor, ids: torch.Tensor, lo: int,
                counts: list[int] | None, factor: float):
        ctx.save_for_backward(ids)
        ctx.lo, ctx.counts, ctx.factor, ctx.rows = lo, counts, factor, shard.shape[0]
        return values.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        if ctx.counts is not None:  # every rank's batch rows: a rank holds rows of any of them
            ids, grad = gather_rows(ids, ctx.counts), gather_rows(grad.contiguous(), ctx.counts)
        col = ids - ctx.lo
        held = (col >= 0) & (col < ctx.rows)
        out = grad.new_zeros((ctx.rows, grad.shape[1]))
        if ctx.rows > 0:  # no boolean indexing: rows another rank holds add zeros at row 0
            out.index_add_(0, torch.where(held, col, torch.zeros_like(col)),
                           grad * (held.unsqueeze(1) * ctx.factor).to(grad.dtype))
        return None, out, None, None, None, None


@dataclass
class CorpusShard:
    """This rank's part of the corpus for the full-corpus training loss (:class:`CorpusSource`).

    ``rows`` [I_r, D] raw (not normalised) item rows of ids [start, start + I_r), differentiable;
    ``split``: whether the corpus is split over the world's ranks (a model-parallel table on
    several ranks: :func:`vocab_parallel_loss`), else ``rows`` is the whole corpus;
    ``tbe``: whether ``rows`` come from the table's fused lookup module (the batch's item rows
    must then route their gradient into them: :meth:`batch_rows`)."""

    rows: torch.Tensor
    start: int
    split: bool
    tbe: bool
    world: int

    def batch_rows(
        self, values: torch.Tensor, ids: torch.Tensor, counts: list[int] | None
    ) -> torch.Tensor:
        """The batch's item rows [n, D] (values from the sparse module, ids int64 [n]) with
        their gradient routed into :attr:`rows` (a no-op unless :attr:`tbe`). ``counts``: every
        rank's n (:class:`hstu.ops.gather.PendingCounts`) when :attr:`split`."""
        if not self.tbe or not torch.is_grad_enabled():
            return values
        # the mean over the ranks that TorchRec's backward all-to-all would have applied
        return _BatchRowsToShard.apply(values, self.rows, ids.to(values.device), self.start,
                                       counts if self.split else None, 1.0 / self.world)


class CorpusSource:
    """Where a retrieval model's full-corpus loss finds its corpus: the item table's rows
    that this rank holds, never a lookup of the catalogue's ids.

    - a model-parallel (row_wise / table_wise) table sharded by TorchRec: this rank's shard
      through its own lookup module (:func:`local_shard_rows`);
    - a data_parallel table (replicated) or a table not sharded yet: its local weight;
    - anything else (a test's plain module): ``fallback()``, a lookup of every id.
    Dynamic tables are refused (hstu.checks.check_full_corpus_table): their rows are slots,
    not ids. ``sparse``: the model's sparse module (an :class:`hstu.embeddings.HstuEmbeddings`);
    ids [min_item_id, num_items) make the corpus."""

    def __init__(
        self, sparse_of, item_feature: str, min_item_id: int, num_items: int, fallback
    ) -> None:
        self._sparse_of = sparse_of  # a callable: the sharded module replaces the sparse one
        self.item_feature = item_feature
        self.min_item_id = min_item_id
        self.num_items = num_items
        self._fallback = fallback

    def __call__(self) -> CorpusShard:
        sparse = self._sparse_of()
        world = dist.get_world_size() if dist.is_initialized() else 1
        specs = getattr(sparse, "specs", None)
        table = getattr(sparse, "_feature_to_table", {}).get(self.item_feature)
        if specs is None or table is None:
            rows = self._fallback(torch.arange(self.min_item_id, self.num_items))
            return CorpusShard(rows, self.min_item_id, False, False, world)
        spec = specs[table]
        assert not spec.dynamic, "refused by hstu.checks.check_full_corpus_table"
        ec = None if spec.sharding_type == "data_parallel" else sparse.ec
        whole = None  # a table held whole: data-parallel, or not sharded (yet)
        if ec is None:
            whole = sparse.dp_ec.embeddings[table].weight
        elif not hasattr(getattr(ec, "module", ec), "_lookups"):
            whole = ec.embeddings[table].weight
        if whole is not None:
            rows = whole[self.min_item_id : self.num_items]
            return CorpusShard(rows, self.min_item_id, False, False, world)
        rows, first = local_shard_rows(ec, table, self.item_feature)
        if not rows.requires_grad and torch.is_grad_enabled():
            # a rank without rows of the table still joins the backward's gathers
            rows = rows.detach().requires_grad_()
        # ids below min_item_id (padding) and rows past num_items are not items
        lo, hi = max(first, self.min_item_id), min(first + rows.shape[0], self.num_items)
        if hi <= lo:
            rows, lo = rows[:0], self.min_item_id
        else:
            rows = rows[lo - first : hi - first]
        return CorpusShard(rows, lo, world > 1, True, world)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _scaled_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if factor == 1.0 else _GradScale.apply(x, factor)


__all__ = ["CorpusShard", "CorpusSource", "local_shard_rows", "vocab_parallel_loss"]
