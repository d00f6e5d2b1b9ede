"""Retrieval metrics on hand-made rankings (pessimistic ties, rank exactly K, unranked)."""

from __future__ import annotations

import math

import pytest
import torch

from hstu.model.metrics import MetricAccumulator, ranks_from_scores, retrieval_metrics
from tests.dist_utils import run_multiprocess

INF = float("inf")


def test_ranks_with_ties_are_pessimistic():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.3],  # target 0 is first -> 1
            [0.5, 0.5, 0.5, 0.1],  # target 1 tied with two others -> 3 (pessimistic)
            [0.2, 0.8, 0.4, 0.4],  # target 3 tied with item 2, behind item 1 -> 3
            [0.1, 0.1, 0.1, 0.1],  # all tied -> last
        ]
    )
    ranks = ranks_from_scores(scores, torch.tensor([0, 1, 3, 2]))
    assert ranks.tolist() == [1.0, 3.0, 3.0, 4.0]


def test_unranked_targets_absent_or_excluded():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    excluded = torch.tensor([[True, False, False], [False, False, False], [False, True, False]])
    # sample 0: item 0 excluded so target 1 moves to rank 1; sample 1: target id 7 is not in the
    # corpus; sample 2: the target itself is in the excluded history
    ranks = ranks_from_scores(scores, torch.tensor([1, 7, 1]), excluded)
    assert ranks.tolist() == [1.0, INF, INF]
    values = retrieval_metrics(ranks, ["HR@1", "NDCG@1", "MRR"])
    assert values["HR@1"].tolist() == [1.0, 0.0, 0.0]
    assert values["NDCG@1"].tolist() == [1.0, 0.0, 0.0]
    assert values["MRR"].tolist() == [1.0, 0.0, 0.0]


def test_rank_exactly_k_counts_and_k_plus_one_does_not():
    ranks = torch.tensor([10.0, 11.0, 1.0, 3.0])
    v = retrieval_metrics(ranks, ["HR@10", "NDCG@10", "HR@3", "MRR"])
    assert v["HR@10"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert v["HR@3"].tolist() == [0.0, 0.0, 1.0, 1.0]
    expected_ndcg = [1 / math.log2(11), 0.0, 1.0, 1 / math.log2(4)]
    assert v["NDCG@10"].tolist() == pytest.approx(expected_ndcg)
    assert v["MRR"].tolist() == pytest.approx([0.1, 1 / 11, 1.0, 1 / 3])


def test_bad_metric_name():
    with pytest.raises(ValueError, match="HR@K"):
        retrieval_metrics(torch.ones(1), ["HR@0"])


def test_accumulator_single_process():
    acc = MetricAccumulator(["HR@1", "MRR"])
    acc.update(retrieval_metrics(torch.tensor([1.0, 2.0]), ["HR@1", "MRR"]))
    acc.update(retrieval_metrics(torch.tensor([INF]), ["HR@1", "MRR"]))
    out = acc.compute()
    assert out["HR@1"] == pytest.approx(1 / 3)
    assert out["MRR"] == pytest.approx(1.5 / 3)


def _acc_body(rank: int, world_size: int) -> None:
    acc = MetricAccumulator(["HR@1"])
    # rank 0: 1 sample, a hit; rank 1: 3 samples, no hit -> 1/4 overall (not mean of means)
    ranks = torch.tensor([1.0]) if rank == 0 else torch.tensor([2.0, 5.0, INF])
    acc.update(retrieval_metrics(ranks, ["HR@1"]))
    assert acc.compute()["HR@1"] == pytest.approx(0.25)


def test_accumulator_all_reduces_over_ranks():
    run_multiprocess(_acc_body, world_size=2)


def test_targets_outside_the_corpus_are_unranked_at_both_ends():
    # item ids 0..3: -1 and 4 (== N) are not items; 3 (the last) and 0 are
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.9]] * 4)
    ranks = ranks_from_scores(scores, torch.tensor([-1, 4, 3, 0]))
    assert ranks.tolist() == [INF, INF, 1.0, 4.0]
    # one-item corpus: only id 0 is ranked
    assert ranks_from_scores(torch.tensor([[0.5]] * 2), torch.tensor([0, 1])).tolist() == [1.0, INF]


def test_accumulator_keeps_counts_and_sums_exact_past_float32():
    # 2**24 + 1 is the first integer float32 cannot hold: sums and counts in float64 give
    # exactly 1.0; float32 anywhere gives 2**24 / (2**24 + 1) or its inverse
    acc = MetricAccumulator(["HR@1"])
    acc.update({"HR@1": torch.ones(2**24)})
    acc.update({"HR@1": torch.ones(1)})
    assert acc.count == 2**24 + 1
    assert acc.compute()["HR@1"] == 1.0


def test_accumulator_one_sample_and_none():
    acc = MetricAccumulator(["MRR"])
    assert math.isnan(acc.compute()["MRR"])  # nothing seen: not a number, never 0
    acc.update({"MRR": torch.tensor([0.25])})
    assert acc.compute()["MRR"] == 0.25


def _group_body(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    # every rank builds both one-rank groups (new_group is collective); each reduces over its own
    groups = [dist.new_group([r]) for r in range(world_size)]
    acc = MetricAccumulator(["HR@1"])
    acc.update({"HR@1": torch.tensor([1.0]) if rank == 0 else torch.tensor([0.0, 0.0])})
    assert acc.compute(groups[rank])["HR@1"] == (1.0 if rank == 0 else 0.0)
    assert acc.compute()["HR@1"] == pytest.approx(1 / 3)  # WORLD by default


def test_accumulator_reduces_over_the_group_given():
    run_multiprocess(_group_body, world_size=2)
