"""Retrieval metrics from the target's rank, and a DP-reducible accumulator.

Ranks are 1-based floats; ``inf`` means the target was not ranked (absent from the corpus or
excluded because it is in the user's input history), which scores 0 on every metric.

Ties are counted PESSIMISTICALLY: rank = 1 + (number of other items scoring >= the target).
An item tied with the target is ranked ahead of it, so a constant model scores rank N, not 1.

    HR@K   = 1 if rank <= K else 0
    NDCG@K = 1 / log2(rank + 1) if rank <= K else 0     (one relevant item: IDCG = 1)
    MRR    = 1 / rank
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from hstu.registry import load, parse_retrieval_metric, retrieval_metric_names


def ranks_from_scores(
    scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """scores [B, N], targets int64 [B], excluded bool [B, N] -> float ranks [B] (pessimistic).

    A target out of [0, N) or excluded gets rank inf; excluded items never count.
    """
    scores = scores.float()
    if excluded is not None:
        scores = scores.masked_fill(excluded, -math.inf)
    num_items = scores.shape[1]
    valid = (targets >= 0) & (targets < num_items)
    safe = targets.clamp(0, max(num_items - 1, 0))
    target_scores = scores.gather(1, safe.unsqueeze(1))  # [B, 1]
    ahead = (scores >= target_scores).sum(1) - 1  # the target itself is >= itself
    ranks = (ahead + 1).float()
    unranked = ~valid | torch.isneginf(target_scores.squeeze(1))
    return ranks.masked_fill(unranked, math.inf)


def hit_rate(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """[B] ranks -> [B] 1.0 where rank <= k."""
    return (ranks <= k).float()


def ndcg(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """[B] ranks -> [B] 1/log2(rank+1) where rank <= k, else 0."""
    safe = torch.where(ranks <= k, ranks, torch.ones_like(ranks))
    return torch.where(ranks <= k, 1.0 / torch.log2(safe + 1.0), torch.zeros_like(ranks))


def reciprocal_rank(ranks: torch.Tensor) -> torch.Tensor:
    """[B] ranks -> [B] 1/rank (0 for inf)."""
    return 1.0 / ranks


def retrieval_metrics(
    ranks: torch.Tensor, names: list[str] | tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Per-sample values of each metric named HR@K, NDCG@K or MRR (hstu.registry:
    RETRIEVAL_METRICS)."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        parsed = parse_retrieval_metric(name)
        if parsed is None:
            raise ValueError(f"{name!r} is not {retrieval_metric_names()}")
        metric, k = parsed
        fn = load(metric.fn)
        out[name] = fn(ranks, k) if metric.at_k else fn(ranks)
    return out


STDERR_PREFIX = "stderr/"
"""``compute(stderr=True)`` reports each metric's standard error under this prefix."""


class MetricAccumulator:
    """Sums per-sample metric values and their squares; ``compute`` all-reduces them and the
    count over a group: each metric's mean and, on request, its standard error (the samples'
    standard deviation over the square root of their count: how far the mean moves from one
    sample of users to another).

    Every rank that evaluates distinct samples must take part (with TP batch gathering each
    TP rank keeps its own samples, so the default group is the whole world).
    """

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        self.names = list(names)
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(self.names), dtype=torch.float64)
        self._squares = torch.zeros(len(self.names), dtype=torch.float64)
        self._count = 0

    def update(self, values: dict[str, torch.Tensor]) -> None:
        sizes = {values[n].numel() for n in self.names}
        assert len(sizes) == 1, f"metric tensors disagree on the sample count: {sizes}"
        per_sample = [values[n].detach().double().cpu() for n in self.names]
        self._sums += torch.stack([v.sum() for v in per_sample])
        self._squares += torch.stack([v.square().sum() for v in per_sample])
        self._count += sizes.pop()

    @property
    def count(self) -> int:
        """The samples this process has added."""
        return self._count

    def compute(self, group: ProcessGroup | None = None, stderr: bool = False
                ) -> dict[str, float]:
        """Means over every sample seen by every rank of ``group`` (WORLD when initialised);
        with ``stderr`` also ``stderr/<name>``, each mean's standard error (NaN under two
        samples).

        The sums live on the host: ``group`` must map host tensors to a backend (the trainer's
        groups do: gloo beside NCCL on GPU hosts, see
        :func:`hstu.training.distributed.process_group_backend`)."""
        k = len(self.names)
        totals = torch.cat([self._sums, self._squares,
                            torch.tensor([float(self._count)], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals, group=group)
        count = totals[-1].item()
        if count == 0:
            means = {n: math.nan for n in self.names}
        else:
            means = {n: (totals[i] / count).item() for i, n in enumerate(self.names)}
        if not stderr:
            return means
        for i, n in enumerate(self.names):
            means[STDERR_PREFIX + n] = _standard_error(totals[i].item(), totals[k + i].item(),
                                                       count)
        return means


def _standard_error(total: float, squares: float, count: float) -> float:
    """The standard error of a mean from the samples' sum and sum of squares (the sample
    variance, n - 1 in the denominator); NaN under two samples."""
    if count < 2:
        return math.nan
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / (count - 1)
    return math.sqrt(variance / count)


__all__ = [
    "STDERR_PREFIX",
    "MetricAccumulator",
    "hit_rate",
    "ndcg",
    "ranks_from_scores",
    "reciprocal_rank",
    "retrieval_metrics",
]
