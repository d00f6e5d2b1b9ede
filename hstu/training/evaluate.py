"""Evaluation: full-corpus HR/NDCG/MRR for retrieval, AUC (per task) for ranking.

Every rank runs the same number of evaluation batches (the loaders pad with masked
samples), because sharded embedding lookups are collective. Metrics count real samples only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hstu.config import RunConfig
from hstu.model import MetricAccumulator, retrieval_metrics
from hstu.model.ranking import ranking_loss
from hstu.training.distributed import DistEnv


def _restart(loader: Any) -> None:
    state = loader.state_dict()
    state.update(epoch=0, batch_index=0)
    loader.load_state_dict(state)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, cfg: RunConfig, env: DistEnv, max_iters: int | None) -> dict[str, float]:
    model.eval()
    _restart(loader)
    if cfg.task == "retrieval":
        return _evaluate_retrieval(model, loader, cfg, env, max_iters)
    return _evaluate_ranking(model, loader, cfg, env, max_iters)


def _evaluate_retrieval(model: Any, loader: Any, cfg: RunConfig, env: DistEnv, max_iters: int | None) -> dict[str, float]:
    names = list(cfg.retrieval.eval_metrics)
    acc = MetricAccumulator(names)
    corpus = model.corpus_vectors()
    top_k = max([int(n.split("@")[1]) for n in names if "@" in n] + [10])
    for i, batch in enumerate(loader):
        if max_iters is not None and i >= max_iters:
            break
        batch = batch.to(env.device)
        result = model.evaluate(batch, top_k=top_k, corpus=corpus)
        ranks = result.target_ranks
        if batch.sample_mask is not None:
            ranks = ranks[batch.sample_mask]
        acc.update(retrieval_metrics(ranks, names))
    return acc.compute()  # host sums: the default group's host backend (gloo) reduces them


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC with ties counted half (Mann-Whitney U); NaN without both classes."""
    from torchmetrics.functional.classification import binary_auroc

    labels = labels.long()
    if labels.numel() == 0 or labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(scores.float(), labels, thresholds=None))


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenates a 1-D/2-D tensor of varying length from every rank (on CPU)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.cpu()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, t.cpu())
    return torch.cat(out)


def _evaluate_ranking(model: Any, loader: Any, cfg: RunConfig, env: DistEnv, max_iters: int | None) -> dict[str, float]:
    num_tasks = cfg.ranking.num_tasks
    all_logits, all_labels = [], []
    loss_sum, loss_n = 0.0, 0
    for i, batch in enumerate(loader):
        if max_iters is not None and i >= max_iters:
            break
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
    stats = torch.tensor([loss_sum, loss_n], dtype=torch.float64)
    dist.all_reduce(stats)
    out: dict[str, float] = {"loss": stats[0].item() / max(stats[1].item(), 1)}
    if width == num_tasks:
        aucs, one_class = [], []
        for task in range(num_tasks):
            bits = (labels >> task) & 1
            aucs.append(_auc(logits[:, task], bits))
            if labels.numel() > 0 and bits.min() == bits.max():
                one_class.append(f"AUC/task{task}" if num_tasks > 1 else "AUC")
        out["AUC"] = float(torch.tensor(aucs).nanmean()) if aucs else float("nan")
        if one_class and env.is_main:  # says which tasks the mean leaves out (NaN AUC)
            left = "left out of the mean AUC" if num_tasks > 1 else "AUC is NaN"
            if 1 < num_tasks == len(one_class):
                left += " (no task left: AUC is NaN)"
            print(
                f"[hstu] {', '.join(one_class)}: only one class among {labels.numel()} "
                f"evaluation candidates; {left}",
                flush=True,
            )
        if num_tasks > 1:
            for task, value in enumerate(aucs):
                out[f"AUC/task{task}"] = value
    else:
        # one class per action value: macro one-vs-rest AUC
        from torchmetrics.functional.classification import multiclass_auroc

        out["AUC"] = float(
            multiclass_auroc(logits.float(), labels.long().clamp(0, width - 1), num_classes=width, average="macro")
        )
    return out


@torch.no_grad()
def popularity_baseline(train_loader: Any, eval_loader: Any, cfg: RunConfig, env: DistEnv,
                        max_iters: int | None) -> dict[str, float] | None:
    """The retrieval metrics of ranking items by how often they occur in the training split
    (history excluded unless ``RetrievalArgs.eval_exclude_history`` is False: the model's
    protocol). None where it does not apply."""
    from hstu.data.loader import SequenceLoader, gather_ranges
    from hstu.model.metrics import ranks_from_scores

    if cfg.task != "retrieval" or not isinstance(train_loader, SequenceLoader):
        return None
    store, samples = train_loader.store, train_loader.samples
    num_items = int(store.items.max()) + 1
    counts = torch.bincount(
        torch.from_numpy(store.items[gather_ranges(samples.hist_start, samples.cand_end)]),
        minlength=num_items,
    ).double()
    counts[0] = -1.0  # id 0 is never an item
    names = list(cfg.retrieval.eval_metrics)
    acc = MetricAccumulator(names)
    _restart(eval_loader)
    for i, batch in enumerate(eval_loader):
        if max_iters is not None and i >= max_iters:
            break
        items = batch.features[batch.item_feature_name]
        scores = counts.expand(batch.batch_size, -1).clone()
        rows = torch.repeat_interleave(torch.arange(batch.batch_size), items.lengths())
        excluded = torch.zeros_like(scores, dtype=torch.bool)
        if cfg.retrieval.eval_exclude_history:
            excluded[rows, items.values()] = True
        ranks = ranks_from_scores(scores, batch.labels, excluded)
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
    train_labels = torch.from_numpy(store.actions[gather_ranges(samples.hist_end, samples.cand_end)])
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
    for i, batch in enumerate(eval_loader):
        if max_iters is not None and i >= max_iters:
            break
        labels = batch.labels
        if batch.sample_mask is not None:
            labels = labels[torch.repeat_interleave(batch.sample_mask, batch.num_candidates)]
        if labels.numel() == 0:
            continue
        scores = logits.expand(labels.numel(), -1)
        loss_sum += float(ranking_loss(scores, labels, num_tasks)) * int(labels.numel())
        loss_n += int(labels.numel())
    stats = torch.tensor([loss_sum, loss_n], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    return {"loss": stats[0].item() / max(stats[1].item(), 1), "AUC": 0.5}
