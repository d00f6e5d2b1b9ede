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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.model.batch_gather import gather_rows
from hstu.ops.losses.full_corpus import HistoryWindow


class _ShardSoftmax(torch.autograd.Function):
    """Per-query cross-entropy [N] over the world's corpus, from this rank's [N, I_r] block."""

    @staticmethod
    def forward(ctx, queries: torch.Tensor, shard: torch.Tensor, target: torch.Tensor, lo: int,
                window: HistoryWindow | None, group: ProcessGroup | None):
        num_q, num_i = queries.shape[0], shard.shape[0]
        logits = queries @ shard.t()  # [N, I_r]
        col = target - lo
        held = (col >= 0) & (col < num_i)
        # -1: a target another rank holds (never one of this rank's columns)
        col = torch.where(held, col, torch.full_like(col, -1))
        if window is not None:
            window.shifted(lo).mask_(logits, 0, col)
        safe = col.clamp(min=0)
        if num_i > 0:
            top = logits.amax(1)
            pos = torch.where(held, logits.gather(1, safe.unsqueeze(1)).squeeze(1), torch.zeros_like(top))
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
        ctx.mark_non_differentiable(pos)
        return losses, pos

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_pos: torch.Tensor):
        queries, shard, local_col, held, probs = ctx.saved_tensors
        rows = torch.arange(probs.shape[0], device=probs.device)
        if probs.shape[1] > 0:
            probs.index_put_((rows, local_col), -held.to(probs.dtype), accumulate=True)
        probs.mul_(grad.unsqueeze(1))
        return probs @ shard, probs.t() @ queries, None, None, None, None


def local_shard_rows(sharded: nn.Module, table: str, feature: str) -> tuple[torch.Tensor, int]:
    """(this rank's rows of ``table`` [I_r, D] as a differentiable lookup, the id of its first
    row) from a TorchRec ``ShardedEmbeddingCollection`` (or the DistributedModelParallel around
    it), row-wise or table-wise (a rank without rows of it: [0, D]). The rows come from the
    rank's own lookup module, called with the local row offsets: no input distribution, no
    output distribution, no collective; backward hands their gradient to that module (FBGEMM's
    fused optimizer then updates them), with no mean over the ranks (hence
    ``corpus_grad_factor``). ``feature``: one of the table's features."""
    ec = getattr(sharded, "module", sharded)
    key = f"embeddings.{table}.weight"
    weight = ec.state_dict()[key]
    shards = weight.local_shards()
    dim = weight.size(1)
    if not shards:
        return torch.empty(0, dim), 0
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
        device = shards[0].tensor.device
        kjt = KeyedJaggedTensor(
            keys=names, values=torch.arange(rows, device=device),
            lengths=torch.tensor(per_key, dtype=torch.int64).to(device), stride=1,
            length_per_key=per_key, offset_per_key=[sum(per_key[:i]) for i in range(len(names) + 1)],
        )
        return lookup(kjt).view(rows, dim), first
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's loss, the target logits of its own queries [Q_r], no gradient).

    ``queries`` [Q_r, D] normalised; ``pos_ids`` int64 [Q_r] item ids; ``shard`` [I_r, D]
    normalised rows of item ids [shard_start, shard_start + I_r) (zero rows where the rank
    holds none); ``counts``: every rank's Q_r (:class:`hstu.model.batch_gather.PendingCounts`);
    ``window``: the own queries' histories (item ids), with ``id_counts`` every rank's number
    of window ids (its ``width`` must cover every rank's histories: the dataset's longest); ``scale``: hstu.model.loss_scale's factor. ``group``: the ranks that split the
    corpus (None: the world, the group the gathers use)."""
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    all_q = gather_rows(queries / temperature, counts)
    all_pos = gather_rows(pos_ids, counts)
    all_window = None
    if window is not None:
        if id_counts is None:
            raise ValueError("vocab_parallel_loss: a history window needs every rank's id count")
        shift = sum(id_counts[:rank])
        all_window = HistoryWindow(
            gather_rows(window.ids, id_counts), gather_rows(window.starts + shift, counts),
            gather_rows(window.lengths, counts), window.width,
        )
    losses, pos = _ShardSoftmax.apply(all_q, _scaled_grad(shard, corpus_grad_factor), all_pos, shard_start,
                                 all_window, group)
    own = losses[start : start + counts[rank]]
    # value: this rank's share (scale * its own queries' losses); gradient: every query's, so
    # that the shard's rows learn from the whole world's queries
    graph = losses.sum() * scale
    reported = own.detach().sum() * scale
    loss = graph + (reported - graph).detach()
    return loss, pos[start : start + counts[rank]]


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


__all__ = ["local_shard_rows", "vocab_parallel_loss"]
