"""Evaluation: full-corpus HR/NDCG/MRR for retrieval, AUC (per task) for ranking.

Every rank runs the same number of evaluation batches (the loaders pad with masked
samples), because sharded embedding lookups are collective. Metrics count real samples only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hstu.config import RunConfig
from hstu.model import MetricAccumulator, retrieval_metrics
from hstu.model.metrics import STDERR_PREFIX
from hstu.model.ranking import ranking_loss
from hstu.model.retrieval import (
    CorpusQueries,
    CorpusSliceScorer,
    block_grid,
    eval_block_items,
    merge_top,
)
from hstu.registry import parse_retrieval_metric
from hstu.training.distributed import DistEnv, gather_objects, rank_and_world


def _restart(loader: Any) -> None:
    state = loader.state_dict()
    state.update(epoch=0, batch_index=0)
    loader.load_state_dict(state)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Any, cfg: RunConfig, env: DistEnv, max_iters: int | None,
    items: torch.Tensor | None = None,
) -> dict[str, float]:
    """The evaluation metrics of ``model`` on ``loader``'s samples. Retrieval ranks each query
    over the catalogue: ``items`` (int64 ids, each held by the item table: a live row of a
    dynamic one), else the model's own (``RetrievalRecommender.catalogue``: the live rows of
    a dynamic item table, every id of a static one). A target outside the catalogue is a miss
    that still counts in the metrics' denominator."""
    model.eval()
    _restart(loader)
    if cfg.task == "retrieval" and getattr(model.dense_module, "decodes_codes", False):
        if items is not None:
            raise ValueError("evaluation items: a semantic-id model decodes over its whole "
                             "catalogue (its codes)")
        return _evaluate_decoded(model, loader, cfg, env, max_iters)
    if cfg.task == "retrieval":
        return _evaluate_retrieval(model, loader, cfg, env, max_iters, items)
    if items is not None:
        raise ValueError("evaluation items are for retrieval (ranking scores its candidates)")
    return _evaluate_ranking(model, loader, cfg, env, max_iters)


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenates a 1-D/2-D tensor of varying length from every rank (on CPU)."""
    return torch.cat(gather_objects(t.cpu()))


def _mean_loss(loss_sum: float, count: int) -> float:
    """The mean of every rank's summed losses over their total count."""
    stats = torch.tensor([loss_sum, count], dtype=torch.float64)
    if rank_and_world()[1] > 1:
        dist.all_reduce(stats)
    return stats[0].item() / max(stats[1].item(), 1)


def _all_reduce_host(t: torch.Tensor, op) -> torch.Tensor:
    """``t`` reduced over the world on the host (the default group's host backend)."""
    host = t.cpu()
    if rank_and_world()[1] > 1:
        dist.all_reduce(host, op=op)
    return host.to(t.device)


def _user_keys(users: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each user id (splitmix64's finaliser over seed and id), uint64
    [n]: the same for a user whatever the split's size, order or rank."""
    with np.errstate(over="ignore"):
        key = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x = users.astype(np.uint64) ^ key
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x ^= x >> np.uint64(shift)
            x *= np.uint64(mul)
        x ^= x >> np.uint64(31)
    return x


def eval_subset(loader: Any, num_users: int, seed: int) -> tuple[Any, int, int]:
    """(the loader over a fixed random subset of ``num_users`` of its samples, the subset's
    size, the split's size): the samples whose seeded hash of the user id is smallest (ties
    by position), the same on every rank and at every evaluation; O(split) work, nothing of
    the user id range's size. ``num_users`` 0 or at least the split: the loader."""
    from hstu.data.loader import SequenceLoader

    total = len(loader.samples) if isinstance(loader, SequenceLoader) else 0
    if num_users <= 0 or not isinstance(loader, SequenceLoader) or num_users >= total:
        return loader, total, total
    keys = _user_keys(loader.samples.user, seed)
    kth = np.partition(keys, num_users - 1)[num_users - 1]
    below = np.flatnonzero(keys < kth)
    tied = np.flatnonzero(keys == kth)[: num_users - below.size]
    keep = np.sort(np.concatenate([below, tied]))
    return loader.subset(keep), num_users, total


def _own_queries(model: Any, loader: Any, env: DistEnv, max_iters: int | None,
                 exclude_history: bool) -> tuple[torch.Tensor, ...]:
    """This rank's real evaluation samples: (queries [n, D], targets [n], history ids [h],
    their sample [h]) on the host, history empty when it stays rankable."""
    queries, targets, hist_ids, hist_rows = [], [], [], []
    n = 0
    for batch in islice(loader, max_iters):
        batch = batch.to(env.device)
        q, ids, seg = model.last_queries(batch)
        labels = batch.labels.to(q.device)
        if batch.sample_mask is not None:
            keep = batch.sample_mask.to(q.device)
            new_row = torch.cumsum(keep.long(), 0) - 1
            kept = keep[seg]
            q, labels, ids, seg = q[keep], labels[keep], ids[kept], new_row[seg[kept]]
        queries.append(q.cpu())
        targets.append(labels.cpu())
        if exclude_history:
            hist_ids.append(ids.cpu())
            hist_rows.append(seg.cpu() + n)
        n += q.shape[0]
    empty = torch.zeros(0, dtype=torch.int64)
    return (
        torch.cat(queries) if queries else torch.zeros(0, 0),
        torch.cat(targets) if targets else empty,
        torch.cat(hist_ids) if hist_ids else empty,
        torch.cat(hist_rows) if hist_rows else empty,
    )


# items per lookup of the catalogue's vectors
_LOOKUP_CHUNK = 65536


def _streams(items: int, dim: int, budget_bytes: int) -> bool:
    """Whether a slice of ``items`` vectors of ``dim`` (float32) is over the budget, so that
    its blocks are looked up as they are scored instead of held."""
    return items * dim * 4 > budget_bytes


def _lookup_groups(grid: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Consecutive blocks of ``grid`` grouped so that one lookup serves a group: a group's
    items fit :data:`_LOOKUP_CHUNK`, or it is one larger block (looked up in pieces)."""
    groups: list[list[tuple[int, int]]] = []
    for a, b in grid:
        if groups and b - groups[-1][0][0] <= _LOOKUP_CHUNK:
            groups[-1].append((a, b))
        else:
            groups.append([(a, b)])
    return groups


class _SliceBlocks:
    """This rank's blocks as (start, end, normalised vectors), looked up group by group as
    they are read (again on every pass): one group's vectors in memory, not the slice's.
    Lookups are collective: every rank makes ``calls`` of them per pass (the most of any
    rank, :meth:`calls_of`), padding with a one-id lookup it drops."""

    def __init__(self, model: Any, grid: list[tuple[int, int]], calls: int,
                 device: torch.device, items: torch.Tensor | None = None) -> None:
        self.model, self.grid, self.calls, self.device = model, grid, calls, device
        self.items = items  # the catalogue's ids by position (None: position = id)

    def _ids(self, start: int, end: int) -> torch.Tensor:
        if self.items is None:
            return torch.arange(start, end, device=self.device)
        return self.items[start:end].to(self.device)

    @staticmethod
    def calls_of(grid: list[tuple[int, int]]) -> int:
        return sum(-(-(g[-1][1] - g[0][0]) // _LOOKUP_CHUNK) for g in _lookup_groups(grid))

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        dense, made = self.model.dense_module, 0
        for group in _lookup_groups(self.grid):
            lo, hi = group[0][0], group[-1][1]
            parts = []
            for c in range(lo, hi, _LOOKUP_CHUNK):
                ids = self._ids(c, min(hi, c + _LOOKUP_CHUNK))
                parts.append(dense.normalise(self.model.lookup_items(ids)))
                made += 1
            vectors = parts[0] if len(parts) == 1 else torch.cat(parts)
            for a, b in group:
                yield a, b, vectors[a - lo:b - lo]
        for _ in range(self.calls - made):
            self.model.lookup_items(torch.tensor([dense.min_item_id], device=self.device))

    def held(self, lo: int, hi: int) -> list[tuple[int, int, torch.Tensor]]:
        """The same blocks over one [hi - lo, D] buffer of the slice (one pass of lookups)."""
        out: torch.Tensor | None = None
        for a, b, vectors in self:
            if out is None:
                out = vectors.new_empty((hi - lo, vectors.shape[1]))
            out[a - lo:b - lo] = vectors
        return [(a, b, out[a - lo:b - lo]) for a, b in self.grid] if out is not None else []


def _positions(items: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position of each of ``ids`` in the ascending ``items``, -1 where it is not one; whether
    it is one)."""
    if items.numel() == 0:
        return torch.full_like(ids, -1), torch.zeros_like(ids, dtype=torch.bool)
    at = torch.searchsorted(items, ids).clamp_(max=items.numel() - 1)
    found = items[at] == ids
    return torch.where(found, at, torch.full_like(at, -1)), found


def rank_corpus(model: Any, own: tuple[torch.Tensor, ...], budget_bytes: int,
                device: torch.device, top_k: int = 0, items: torch.Tensor | None = None):
    """Full-corpus ranking of every rank's queries, the catalogue sharded over the ranks
    (hstu.model.retrieval, "sharded full-corpus ranking"). ``own``: this rank's (queries,
    targets, history ids, their rows) from :func:`_own_queries`. ``items``: the catalogue,
    int64 ids ascending, the same on every rank (a dynamic item table's live items); a target
    not among them is unranked (a miss), and the blocks are positions in it; None: every id
    of [min_item_id, num_items). Returns (target ranks of this rank's own queries [n],
    (top scores, top ids) [n, top_k] or None)."""
    rank, world = rank_and_world()
    dense = model.dense_module
    every = gather_objects(own)
    counts = [p[0].shape[0] for p in every]
    starts = [sum(counts[:r]) for r in range(world)]
    first = starts[rank]
    queries = torch.cat([p[0] for p in every if p[0].numel() > 0] or [own[0]]).to(device)
    targets = torch.cat([p[1] for p in every])
    history = torch.cat([p[2] for p in every])
    history_rows = torch.cat([p[3] + starts[r] for r, p in enumerate(every)])
    num_items, min_item_id = dense.num_items, dense.min_item_id
    if items is not None:  # ids -> positions in the catalogue (history outside it: dropped)
        items = items.cpu()
        num_items, min_item_id = items.numel(), 0
        targets = _positions(items, targets)[0]
        history, held = _positions(items, history)
        history, history_rows = history[held], history_rows[held]
    q = CorpusQueries.build(queries, targets.to(device), history.to(device),
                            history_rows.to(device))
    block = eval_block_items(q.targets.numel(), budget_bytes, torch.device(device))
    grids = [block_grid(num_items, block, r, world) for r in range(world)]
    slices = [(g[0][0], g[-1][1]) if g else (0, 0) for g in grids]
    lo, hi = slices[rank]
    longest = max(b - a for a, b in slices)
    calls = max(_SliceBlocks.calls_of(g) for g in grids)
    blocks: Any = _SliceBlocks(model, grids[rank], calls, device, items)
    if not _streams(longest, queries.shape[1], budget_bytes):
        blocks = blocks.held(lo, hi)  # the slice fits the budget: looked up once
    scorer = CorpusSliceScorer(q, num_items=num_items, min_item_id=min_item_id)
    target = _all_reduce_host(scorer.target_scores(blocks), dist.ReduceOp.MAX)
    ahead, top_scores, top_ids = scorer.count_and_top(blocks, target, top_k)
    ahead = _all_reduce_host(ahead, dist.ReduceOp.SUM)
    ranks = scorer.ranks(target, ahead)[first:first + counts[rank]]
    top = None
    if top_k > 0:
        parts = gather_objects((top_scores.cpu(), top_ids.cpu()))
        scores, ids = merge_top(parts, top_k)
        if items is not None:
            ids = items[ids]
        top = (scores[first:first + counts[rank]], ids[first:first + counts[rank]])
    return ranks, top


class ColdTargets:
    """The metrics of the evaluation samples whose target is a cold item (the loader's
    ``cold_items``, DatasetArgs.cold_items): ``cold/<metric>`` and ``cold/events``, their
    count over every rank; nothing without cold items."""

    PREFIX = "cold/"

    def __init__(self, loader: Any, names: list[str]) -> None:
        ids = getattr(loader, "cold_items", None)
        self.ids = None if ids is None else torch.as_tensor(np.asarray(ids, dtype=np.int64))
        self.names = names
        self.acc = MetricAccumulator(names)

    def update(self, ranks: torch.Tensor, targets: torch.Tensor) -> None:
        """Ranks [n] of samples whose target ids are ``targets`` [n]."""
        if self.ids is not None:
            cold = torch.isin(targets.cpu(), self.ids)
            self.acc.update(retrieval_metrics(ranks.cpu()[cold], self.names))

    def compute(self) -> dict[str, float]:
        """Collective (every rank calls it, as MetricAccumulator.compute)."""
        if self.ids is None:
            return {}
        count = _all_reduce_host(torch.tensor([float(self.acc.count)], dtype=torch.float64),
                                 dist.ReduceOp.SUM)
        out = {self.PREFIX + k: v for k, v in self.acc.compute().items()}
        out[self.PREFIX + "events"] = float(count[0])
        return out


TARGET_COUNT_EDGES = (0, 5, 20, 100)
"""The groups :class:`TargetCounts` splits an evaluation into: targets seen 0-4, 5-19,
20-99 and 100 or more times in training."""


def count_group(lo: int, hi: int | None) -> str:
    """The key prefix of one group (``seen_0-4/``, ``seen_100+/``)."""
    return f"seen_{lo}+/" if hi is None else f"seen_{lo}-{hi - 1}/"


COUNT_GROUPS = tuple(
    count_group(lo, hi)
    for lo, hi in zip(TARGET_COUNT_EDGES, (*TARGET_COUNT_EDGES[1:], None), strict=True)
)


class TargetCounts:
    """The metrics of the evaluation samples grouped by how often their target occurs in the
    training split (the loader's ``target_counts``, set on the validation and test splits'
    when a run selects on validation): per group of
    :data:`TARGET_COUNT_EDGES`, ``seen_<lo>-<hi>/<metric>`` and ``seen_<lo>-<hi>/events`` (their
    count over every rank); nothing without counts. Where a model loses, on rare or on
    frequent items, is what two models with the same total can differ by."""

    def __init__(self, loader: Any, names: list[str]) -> None:
        counts = getattr(loader, "target_counts", None)
        self.counts = None if counts is None else torch.as_tensor(np.asarray(counts))
        self.names = names
        self.accs = [MetricAccumulator(names) for _ in COUNT_GROUPS]

    def update(self, ranks: torch.Tensor, targets: torch.Tensor) -> None:
        """Ranks [n] of samples whose target ids are ``targets`` [n] (an id the training
        split never holds counts 0)."""
        if self.counts is None:
            return
        targets = targets.cpu().long()
        known = (targets >= 0) & (targets < self.counts.numel())
        seen = torch.where(known, self.counts[targets.clamp(0, self.counts.numel() - 1)], 0)
        group = torch.bucketize(seen, torch.tensor(TARGET_COUNT_EDGES[1:]), right=True)
        values = retrieval_metrics(ranks.cpu(), self.names)
        for g, acc in enumerate(self.accs):
            pick = group == g
            acc.update({k: v[pick] for k, v in values.items()})

    def compute(self) -> dict[str, float]:
        """Collective (every rank calls it, as MetricAccumulator.compute)."""
        if self.counts is None:
            return {}
        out: dict[str, float] = {}
        for prefix, acc in zip(COUNT_GROUPS, self.accs, strict=True):
            count = _all_reduce_host(torch.tensor([float(acc.count)], dtype=torch.float64),
                                     dist.ReduceOp.SUM)
            out.update({prefix + k: v for k, v in acc.compute().items()})
            out[prefix + "events"] = float(count[0])
        return out


def training_item_counts(train_loader: Any) -> np.ndarray | None:
    """How often each item id occurs in the training split's samples (histories and
    targets), int64 [max id + 1]; None where the loader is not over stored sequences."""
    from hstu.data.loader import SequenceLoader

    if not isinstance(train_loader, SequenceLoader):
        return None
    store, samples = train_loader.store, train_loader.samples
    num_items = int(store.items.max()) + 1  # a pass over the mapped column, no copy
    return range_item_counts(store.items, samples.hist_start, samples.cand_end, num_items)


def _evaluate_retrieval(
    model: Any, loader: Any, cfg: RunConfig, env: DistEnv, max_iters: int | None,
    items: torch.Tensor | None = None,
) -> dict[str, float]:
    r = cfg.retrieval
    names = list(r.eval_metrics)
    catalogue = model.catalogue(items)
    cold, seen = ColdTargets(loader, names), TargetCounts(loader, names)
    loader, used, total = eval_subset(loader, r.eval_num_users, cfg.trainer.seed)
    own = _own_queries(model, loader, env, max_iters, r.eval_exclude_history)
    ranks, _ = rank_corpus(model, own, r.eval_memory_mb << 20, env.device, items=catalogue)
    acc = MetricAccumulator(names)
    acc.update(retrieval_metrics(ranks.cpu(), names))
    cold.update(ranks, own[1])
    seen.update(ranks, own[1])
    # host sums: the default group's host backend (gloo) reduces them
    out = acc.compute(stderr=True)
    out.update(cold.compute())
    out.update(seen.compute())
    return _of_subset(out, used, total, cfg, env)


def _of_subset(out: dict[str, float], used: int, total: int, cfg: RunConfig, env: DistEnv
               ) -> dict[str, float]:
    """Metrics of a subset of the users (RetrievalArgs.eval_num_users) carry the summary field
    that says so, and the log says so in one line."""
    if used < total:
        out["eval_users"] = float(used)
        if env.is_main:
            print(f"[hstu] evaluation on a fixed random subset of {used} of {total} users "
                  f"(RetrievalArgs.eval_num_users, seed {cfg.trainer.seed})", flush=True)
    return out


def _evaluate_decoded(
    model: Any, loader: Any, cfg: RunConfig, env: DistEnv, max_iters: int | None,
) -> dict[str, float]:
    """Retrieval metrics of a semantic-id model (NetworkArgs.architecture="hstu_sid"): each
    query's top-k by beam search (k: the largest K of the metrics, 200 with MRR alone); a
    target outside its query's top-k has rank inf (MRR is MRR@k)."""
    r = cfg.retrieval
    names = list(r.eval_metrics)
    top_k = max([k for name in names if (k := parse_retrieval_metric(name)[1])] or [200])
    loader, used, total = eval_subset(loader, r.eval_num_users, cfg.trainer.seed)
    acc = MetricAccumulator(names)
    cold, seen = ColdTargets(loader, names), TargetCounts(loader, names)
    dense = model.dense_module
    for batch in islice(loader, max_iters):
        batch = batch.to(env.device)
        ranks = dense.target_ranks(batch, model.sparse(batch.features), top_k)
        targets = batch.labels
        if batch.sample_mask is not None:
            ranks = ranks[batch.sample_mask.to(ranks.device)]
            targets = targets[batch.sample_mask.to(targets.device)]
        acc.update(retrieval_metrics(ranks.cpu(), names))
        cold.update(ranks, targets)
        seen.update(ranks, targets)
    out = acc.compute(stderr=True)
    out.update(cold.compute())
    out.update(seen.compute())
    return _of_subset(out, used, total, cfg, env)


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC with ties counted half (Mann-Whitney U); NaN without both classes."""
    from torchmetrics.functional.classification import binary_auroc

    labels = labels.long()
    if labels.numel() == 0 or labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(scores.float(), labels, thresholds=None))


def _evaluate_ranking(
    model: Any, loader: Any, cfg: RunConfig, env: DistEnv, max_iters: int | None
) -> dict[str, float]:
    num_tasks = cfg.ranking.num_tasks
    all_logits, all_labels = [], []
    loss_sum, loss_n = 0.0, 0
    for batch in islice(loader, max_iters):
        batch = model.prepare(batch.to(env.device))
        # the model's own loss counts padding candidates: the loss is recomputed below
        _, (logits, labels) = model(batch)
        keep = None
        if batch.sample_mask is not None:
            keep = torch.repeat_interleave(batch.sample_mask, batch.num_candidates)
            logits, labels = logits[keep], labels[keep]
        logits = logits.float()
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        # ranking_loss is a mean over the real candidates; weighted by their count it sums
        loss_sum += float(ranking_loss(logits, labels, num_tasks)) * int(labels.numel())
        loss_n += int(labels.numel())
    width = cfg.ranking.prediction_head_arch[-1]
    logits = _gather(torch.cat(all_logits) if all_logits else torch.zeros(0, width))
    labels = _gather(torch.cat(all_labels) if all_labels else torch.zeros(0, dtype=torch.int64))
    out: dict[str, float] = {"loss": _mean_loss(loss_sum, loss_n)}
    aucs, one_class = ranking_aucs(logits, labels, num_tasks, width, stderr=True)
    out.update(aucs)
    if one_class and env.is_main:  # says which tasks the mean leaves out (NaN AUC)
        left = "left out of the mean AUC" if num_tasks > 1 else "AUC is NaN"
        if 1 < num_tasks == len(one_class):
            left += " (no task left: AUC is NaN)"
        print(
            f"[hstu] {', '.join(one_class)}: only one class among {labels.numel()} "
            f"evaluation candidates; {left}",
            flush=True,
        )
    return out


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """The standard error of an AUC over ``positives`` and ``negatives`` independent samples
    (Hanley and McNeil, 1982); NaN where the AUC is."""
    if math.isnan(auc) or positives < 1 or negatives < 1:
        return math.nan
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1.0 - auc) + (positives - 1) * (q1 - auc * auc)
           + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def _mean_stderr(errors: list[float]) -> float:
    """The standard error of the mean of independent estimates with these standard errors
    (NaN ones, like their NaN values, left out of the mean)."""
    kept = [e for e in errors if not math.isnan(e)]
    return math.sqrt(sum(e * e for e in kept)) / len(kept) if kept else math.nan


def ranking_aucs(logits: torch.Tensor, labels: torch.Tensor, num_tasks: int,
                 width: int, stderr: bool = False) -> tuple[dict[str, float], list[str]]:
    """The ranking metrics of scores ``logits`` [n, width] for ``labels`` [n] (the model's,
    and the per-item baseline's, by the same code): with one logit per task (width ==
    num_tasks), the mean over tasks of each task bit's AUC (``AUC``, and ``AUC/task<t>`` when
    there are several); else one class per action value, the macro one-vs-rest ``AUC``.
    With ``stderr`` also ``stderr/<metric>`` (:func:`auc_standard_error`, candidates taken as
    independent; a mean's from its terms'). Returns (metrics, the names of the tasks with one
    class only: NaN, left out of the mean)."""
    out: dict[str, float] = {}
    one_class: list[str] = []
    errors: list[float] = []
    n = labels.numel()
    if width == num_tasks:
        aucs = []
        for task in range(num_tasks):
            bits = (labels >> task) & 1
            aucs.append(_auc(logits[:, task], bits))
            positives = int(bits.sum())
            errors.append(auc_standard_error(aucs[-1], positives, n - positives))
            if labels.numel() > 0 and bits.min() == bits.max():
                one_class.append(f"AUC/task{task}" if num_tasks > 1 else "AUC")
        out["AUC"] = float(torch.tensor(aucs).nanmean()) if aucs else float("nan")
        if num_tasks > 1:
            for task, value in enumerate(aucs):
                out[f"AUC/task{task}"] = value
                if stderr:
                    out[f"{STDERR_PREFIX}AUC/task{task}"] = errors[task]
    else:
        # one class per action value: macro one-vs-rest AUC
        from torchmetrics.functional.classification import multiclass_auroc

        classes = labels.long().clamp(0, width - 1)
        out["AUC"] = float(
            multiclass_auroc(logits.float(), classes, num_classes=width, average="macro")
        )
        if stderr and n > 0:
            per_class = multiclass_auroc(logits.float(), classes, num_classes=width,
                                         average=None)
            counts = torch.bincount(classes, minlength=width)
            errors = [auc_standard_error(float(a), int(c), n - int(c))
                      for a, c in zip(per_class, counts) if 0 < int(c) < n]
    if stderr:
        out[STDERR_PREFIX + "AUC"] = _mean_stderr(errors)
    return out, one_class


def count_ranks(scores: torch.Tensor, targets: torch.Tensor, excluded_rows: torch.Tensor,
                excluded_ids: torch.Tensor, ordered: torch.Tensor | None = None) -> torch.Tensor:
    """The ranks :func:`hstu.model.metrics.ranks_from_scores` gives for one score per item
    shared by every sample (``scores`` [N]; sample b's excluded items (excluded_rows ==
    b) never count, an excluded target is unranked), without a [B, N] matrix: how many items
    score >= the target from the sorted scores (``ordered``: ``scores`` sorted ascending, when
    the caller already has them), less the sample's excluded ones."""
    n = scores.numel()
    valid = (targets >= 0) & (targets < n)
    target_scores = scores[targets.clamp(0, max(n - 1, 0))]
    if ordered is None:
        ordered = torch.sort(scores).values
    at_least = n - torch.searchsorted(ordered, target_scores, right=False)
    # each sample's distinct excluded items (a history may repeat one)
    pairs = torch.unique(excluded_rows * n + excluded_ids)
    rows, ids = pairs // n, pairs % n
    counted = scores[ids] >= target_scores[rows]
    is_target = ids == targets[rows]
    at_least -= torch.bincount(rows[counted], minlength=targets.numel())
    target_excluded = torch.zeros_like(valid)
    target_excluded[rows[is_target]] = True
    ranks = at_least.double()  # the target itself is among the items >= its score
    return ranks.float().masked_fill(~valid | target_excluded, float("inf"))


# rows of the item column counted per block by range_item_counts (int32 ids: 16 MiB)
_COUNT_BLOCK_ROWS = 1 << 22


def range_item_counts(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, num_items: int,
                      block_rows: int | None = None) -> np.ndarray:
    """How often each item id occurs in the rows ``starts[i]:ends[i]`` of ``items`` (a row
    in several ranges counted once per range), int64 [num_items]. Legend: N rows of
    ``items`` (a memory-mapped column of :class:`hstu.data.store.SequenceStore`), S ranges.

    The ranges are visited in row order in groups spanning about ``block_rows`` rows (one
    range longer than that alone); each group counts its slice of the column weighted by how
    many of its ranges cover each row. Memory: O(S + block_rows + num_items), never an
    array of the ranges' total rows (the copy of every training interaction it replaces).
    ``block_rows`` None: ``_COUNT_BLOCK_ROWS``."""
    block_rows = block_rows or _COUNT_BLOCK_ROWS
    counts = np.zeros(num_items, dtype=np.int64)
    keep = ends > starts
    order = np.argsort(starts[keep], kind="stable")
    lo_all = starts[keep][order].astype(np.int64)
    hi_all = ends[keep][order].astype(np.int64)
    reach = np.maximum.accumulate(hi_all) if hi_all.size else hi_all  # furthest end so far
    i = 0
    while i < lo_all.size:
        lo = int(lo_all[i])
        # the next ranges whose rows (and every earlier range's) end by lo + block_rows
        j = max(i + 1, int(np.searchsorted(reach, lo + block_rows, side="right")))
        hi = int(reach[j - 1])
        cover = np.zeros(hi - lo + 1, dtype=np.int32)
        np.add.at(cover, lo_all[i:j] - lo, 1)
        np.add.at(cover, hi_all[i:j] - lo, -1)
        cover = np.cumsum(cover[:-1], dtype=np.int32)
        ids = np.asarray(items[lo:hi])
        if np.all(cover == 1):
            counts += np.bincount(ids, minlength=num_items)
        else:
            weighted = np.bincount(ids, weights=cover, minlength=num_items)
            counts += np.rint(weighted).astype(np.int64)
        i = j
    return counts


@torch.no_grad()
def popularity_baseline(train_loader: Any, eval_loader: Any, cfg: RunConfig, env: DistEnv,
                        max_iters: int | None) -> dict[str, float] | None:
    """The retrieval metrics of ranking items by how often they occur in the training split
    (history excluded unless ``RetrievalArgs.eval_exclude_history`` is False: the model's
    protocol). None where it does not apply."""
    if cfg.task != "retrieval":
        return None
    # the test split's loader holds the counts already (TargetCounts): one pass, not two
    found = getattr(eval_loader, "target_counts", None)
    if found is None:
        found = training_item_counts(train_loader)
    if found is None:
        return None
    counts = torch.from_numpy(found).double()
    counts[0] = -1.0  # id 0 is never an item
    ordered = torch.sort(counts).values  # the same for every batch
    names = list(cfg.retrieval.eval_metrics)
    acc = MetricAccumulator(names)
    eval_loader, _, _ = eval_subset(eval_loader, cfg.retrieval.eval_num_users, cfg.trainer.seed)
    _restart(eval_loader)
    for batch in islice(eval_loader, max_iters):
        items = batch.features[batch.item_feature_name]
        rows = torch.repeat_interleave(torch.arange(batch.batch_size), items.lengths())
        excluded = items.values() if cfg.retrieval.eval_exclude_history else items.values()[:0]
        ranks = count_ranks(counts, batch.labels, rows[: excluded.numel()], excluded, ordered)
        if batch.sample_mask is not None:
            ranks = ranks[batch.sample_mask]
        acc.update(retrieval_metrics(ranks, names))
    return acc.compute()


@torch.no_grad()
def prior_baseline(train_loader: Any, eval_loader: Any, cfg: RunConfig, env: DistEnv,
                   max_iters: int | None) -> dict[str, float] | None:
    """Ranking's floor: every candidate scored with the training labels' prior (per task, the
    positive rate; for class heads, the class frequencies), the same evaluation candidates as
    the model. Its AUC is 0.5 by construction (one score for all); its loss is the one to beat.
    None where it does not apply (retrieval, benchmark data)."""
    from hstu.data.loader import SequenceLoader, gather_ranges

    if cfg.task != "ranking" or not isinstance(train_loader, SequenceLoader):
        return None
    store, samples = train_loader.store, train_loader.samples
    if store.actions is None:
        return None
    candidates = gather_ranges(samples.hist_end, samples.cand_end)
    train_labels = torch.from_numpy(store.actions[candidates])
    num_tasks = cfg.ranking.num_tasks
    width = cfg.ranking.prediction_head_arch[-1]
    eps = 1e-6
    if width == num_tasks:  # BCE per task: logit of the positive rate
        rate = torch.stack([((train_labels >> t) & 1).double().mean() for t in range(num_tasks)])
        logits = torch.logit(rate.clamp(eps, 1 - eps)).float()
    else:  # cross-entropy: log of the class frequencies
        counts = torch.bincount(train_labels.clamp(0, width - 1), minlength=width).double()
        logits = ((counts + eps) / (counts.sum() + eps * width)).log().float()
    loss_sum, loss_n = 0.0, 0
    _restart(eval_loader)
    for batch in islice(eval_loader, max_iters):
        labels = batch.labels
        if batch.sample_mask is not None:
            labels = labels[torch.repeat_interleave(batch.sample_mask, batch.num_candidates)]
        if labels.numel() == 0:
            continue
        scores = logits.expand(labels.numel(), -1)
        loss_sum += float(ranking_loss(scores, labels, num_tasks)) * int(labels.numel())
        loss_n += int(labels.numel())
    return {"loss": _mean_loss(loss_sum, loss_n), "AUC": 0.5}


ITEM_RATE_PSEUDO_LABELS = 10.0
"""The per-item baseline's shrinkage: an item's training labels are pooled with this many
pseudo-labels at the label prior's rate (an item seen once does not score 0 or 1)."""


@torch.no_grad()
def item_rate_baseline(train_loader: Any, eval_loader: Any, cfg: RunConfig, env: DistEnv,
                       max_iters: int | None) -> dict[str, float] | None:
    """Ranking's non-sequential floor: every evaluation candidate scored with its item's
    training labels alone (per task, the item's positive rate; for class heads, its class
    frequencies), shrunk toward the label prior by :data:`ITEM_RATE_PSEUDO_LABELS`; an item
    without training labels gets the prior. No user, no history: what a model must beat to
    have learnt more than each item's average label. Training labels: every interaction the
    training samples read (histories and candidates). Scored on the same evaluation
    candidates (same ``max_iters``) with the model's loss and AUC (:func:`ranking_aucs`).
    None where it does not apply (retrieval, data without labels)."""
    from hstu.data.loader import SequenceLoader, gather_ranges

    if cfg.task != "ranking" or not isinstance(train_loader, SequenceLoader):
        return None
    store, samples = train_loader.store, train_loader.samples
    if store.actions is None:
        return None
    num_tasks = cfg.ranking.num_tasks
    width = cfg.ranking.prediction_head_arch[-1]
    bce = width == num_tasks
    # per item: training labels, and positives per task (bce) or labels per class; counted
    # over groups of samples of about _COUNT_BLOCK_ROWS rows (never a copy of every row)
    n = int(store.items.max()) + 1  # a pass over the mapped column, no copy
    seen = np.zeros(n, dtype=np.int64)
    hits = np.zeros((n, num_tasks if bce else width), dtype=np.int32)  # [n, T or K]
    lengths = samples.cand_end - samples.hist_start
    group = np.cumsum(lengths) // _COUNT_BLOCK_ROWS
    for g in np.unique(group):
        pick = group == g
        rows = gather_ranges(samples.hist_start[pick], samples.cand_end[pick])
        items = np.asarray(store.items[rows]).astype(np.int64)
        labels = np.asarray(store.actions[rows]).astype(np.int64)
        seen += np.bincount(items, minlength=n)
        if bce:
            for t in range(num_tasks):
                positive = items[(labels >> t) & 1 == 1]
                hits[:, t] += np.bincount(positive, minlength=n).astype(np.int32)
        else:
            cls = np.clip(labels, 0, width - 1)
            counts = np.bincount(items * width + cls, minlength=n * width)
            hits += counts.reshape(n, width).astype(np.int32)
    m, eps = ITEM_RATE_PSEUDO_LABELS, 1e-6
    total = max(int(seen.sum()), 1)
    if bce:  # per task: the item's positive rate, shrunk toward the prior
        prior = torch.from_numpy(hits.sum(0) / total)
    else:  # cross-entropy: the item's class frequencies, shrunk toward the prior
        prior = torch.from_numpy((hits.sum(0) + eps) / (total + eps * width))
    seen_t, hits_t = torch.from_numpy(seen), torch.from_numpy(hits)

    def rates(cand: torch.Tensor) -> torch.Tensor:
        """[c, tasks or classes] float64 of the candidate items (the prior where unseen)."""
        known = (cand >= 0) & (cand < n)
        idx = torch.where(known, cand, torch.zeros_like(cand))
        got = (hits_t[idx].double() + m * prior) / (seen_t[idx].double()[:, None] + m)
        return torch.where(known[:, None], got, prior.expand_as(got))

    # probabilities (in [0, 1]) are what the AUC ranks (equal rates stay ties); the loss
    # takes their logits / logs
    scores, wanted = [], []
    _restart(eval_loader)
    for batch in islice(eval_loader, max_iters):
        feature = batch.features[batch.item_feature_name]
        ends = torch.cumsum(feature.lengths(), 0).numpy()
        picked = gather_ranges(ends - batch.num_candidates.numpy(), ends)
        cand = feature.values()[torch.from_numpy(picked)].long()
        got, lab = rates(cand), batch.labels
        if batch.sample_mask is not None:
            keep = torch.repeat_interleave(batch.sample_mask, batch.num_candidates)
            got, lab = got[keep], lab[keep]
        scores.append(got)
        wanted.append(lab)
    probs = _gather(
        torch.cat(scores) if scores else torch.zeros(0, hits.shape[1], dtype=torch.float64)
    )
    labels = _gather(torch.cat(wanted) if wanted else torch.zeros(0, dtype=torch.int64))
    if labels.numel() == 0:
        return None
    clipped = probs.clamp(eps, 1 - eps) if bce else probs
    logits = (torch.logit(clipped) if bce else clipped.log()).float()
    out = {"loss": float(ranking_loss(logits, labels, num_tasks))}
    out.update(ranking_aucs(probs.float(), labels, num_tasks, width)[0])
    return out
