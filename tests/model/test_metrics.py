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


def _stderr_body(rank: int, world_size: int) -> None:
    # the standard error of the mean over both ranks' samples (uneven counts), as numpy's
    # sample standard deviation over sqrt(n) of all of them together
    gen = torch.Generator().manual_seed(7)
    ranks = torch.randint(1, 40, (300,), generator=gen).double()
    mine = ranks[:100] if rank == 0 else ranks[100:]
    acc = MetricAccumulator(["NDCG@10", "HR@10"])
    for chunk in mine.split(64):  # several updates: the sums of squares accumulate
        acc.update(retrieval_metrics(chunk, ["NDCG@10", "HR@10"]))
    out = acc.compute(stderr=True)
    for name in ("NDCG@10", "HR@10"):
        every = retrieval_metrics(ranks, [name])[name].numpy()
        want = every.std(ddof=1) / math.sqrt(every.size)
        assert want > 0.01
        assert out["stderr/" + name] == pytest.approx(want, rel=1e-9)
        assert out[name] == pytest.approx(every.mean(), rel=1e-12)
    assert "stderr/HR@10" not in acc.compute()  # only on request


def test_accumulator_standard_error_over_ranks():
    run_multiprocess(_stderr_body, world_size=2)


def test_standard_error_of_constant_values_and_of_one_sample():
    acc = MetricAccumulator(["HR@1"])
    acc.update({"HR@1": torch.ones(50)})
    assert acc.compute(stderr=True)["stderr/HR@1"] == 0.0  # every user alike: no spread
    one = MetricAccumulator(["HR@1"])
    one.update({"HR@1": torch.ones(1)})
    assert math.isnan(one.compute(stderr=True)["stderr/HR@1"])  # one user: unknown, never 0


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


def test_auc_standard_error_matches_a_bootstrap():
    from hstu.training.evaluate import _auc, auc_standard_error, ranking_aucs

    gen = torch.Generator().manual_seed(3)
    labels = (torch.rand(600, generator=gen) < 0.3).long()
    scores = labels.float() * 0.8 + torch.randn(600, generator=gen)
    auc = _auc(scores, labels)
    positives = int(labels.sum())
    error = auc_standard_error(auc, positives, 600 - positives)
    boot = []
    for _ in range(400):  # resampling the candidates: the spread an evaluation set has
        pick = torch.randint(0, 600, (600,), generator=gen)
        boot.append(_auc(scores[pick], labels[pick]))
    assert 0.01 < error == pytest.approx(torch.tensor(boot).std().item(), rel=0.15)
    out, _ = ranking_aucs(scores[:, None], labels, 1, 1, stderr=True)
    assert out["stderr/AUC"] == error and "stderr/AUC" not in ranking_aucs(
        scores[:, None], labels, 1, 1)[0]
    # two tasks: the mean's standard error from its terms' (independent: sqrt(sum e^2) / 2)
    two = labels | (labels << 1)
    out, _ = ranking_aucs(torch.stack([scores, scores], 1), two, 2, 2, stderr=True)
    assert out["stderr/AUC/task1"] == error
    assert out["stderr/AUC"] == pytest.approx(math.sqrt(2 * error**2) / 2)
