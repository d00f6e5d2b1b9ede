"""negative_sampling="mixed_logq": the in-batch positives plus the batch's shared uniform
draws, logQ-corrected, against the loss written out column by column; the correction's
inclusion rate against the real sampler's draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hstu.data.negatives import NegativeSampler
from hstu.ops.losses import LossInputs
from hstu.ops.losses.strategies import mixed_logq


def _written_out(queries, pos_vectors, pos_ids, key_vectors, key_ids, draws, population,
                 temperature, correct=True) -> float:
    """Per query: the positive and every negative (the batch's positives, then the drawn
    ids; the query's own id left out), each logit less log(its count among the batch's
    positives + the chance that `draws` uniform draws over `population` items include it)."""
    inclusion = 1.0 - ((population - 1) / population) ** draws

    def log_q(item: int) -> float:
        return math.log(sum(int(b) == item for b in pos_ids) + inclusion) if correct else 0.0

    negatives = [(pos_vectors[j], int(pos_ids[j])) for j in range(len(pos_ids))]
    negatives += [(key_vectors[j], int(key_ids[j])) for j in range(len(key_ids))]
    total = 0.0
    for q in range(queries.shape[0]):
        pos = float(queries[q] @ pos_vectors[q]) / temperature - log_q(int(pos_ids[q]))
        logits = [pos] + [float(queries[q] @ v) / temperature - log_q(i)
                          for v, i in negatives if i != int(pos_ids[q])]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - pos
    return total / queries.shape[0]


def test_the_loss_is_the_corrected_softmax_written_out() -> None:
    torch.manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    queries, pos_vectors = unit(5), unit(5)
    pos_ids = torch.tensor([3, 7, 3, 9, 2])  # item 3 twice in the batch
    pos_vectors[2] = pos_vectors[0]
    key_ids = torch.tensor([4, 7, 11])  # item 7 also drawn: an in-batch positive
    key_vectors = unit(3)
    key_vectors[1] = pos_vectors[1]
    draws, population, temperature = 8, 12, 0.3
    x = LossInputs(queries, pos_ids, pos_vectors, temperature, draws, True, None, 1,
                   torch.float64, key_ids=key_ids, key_vectors=key_vectors, population=population)
    loss, (pos_logits, _) = mixed_logq(x)
    args = (queries, pos_vectors, pos_ids, key_vectors, key_ids, draws, population, temperature)
    want = _written_out(*args)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert abs(_written_out(*args, correct=False) - want) > 1e-3  # the correction matters here
    inclusion = 1.0 - (11 / 12) ** 8
    raw = float(queries[0] @ pos_vectors[0]) / temperature
    assert float(pos_logits[0]) == pytest.approx(raw - math.log(2 + inclusion), rel=1e-12)
    for t in (queries, pos_vectors, key_vectors):
        t.requires_grad_(True)
    x = LossInputs(queries, pos_ids, pos_vectors, temperature, draws, True, None, 1,
                   torch.float64, key_ids=key_ids, key_vectors=key_vectors, population=population)
    mixed_logq(x)[0].backward()
    assert all(float(t.grad.abs().sum()) > 0 for t in (queries, pos_vectors, key_vectors))


def test_the_correction_is_the_rate_at_which_the_sampler_includes_an_item() -> None:
    """The shared draw (distinct ids of num_negatives draws) includes each item at the rate
    the loss subtracts: measured over 4,000 batches of the real sampler."""
    num_items, min_id, m = 41, 1, 30
    population = num_items - min_id
    sampler = NegativeSampler("shared", m, min_id, num_items, "item", seed=5)
    hits = np.zeros(num_items)
    batches = 4000
    for b in range(batches):
        ids = sampler.draw_shared(np.arange(8 * b, 8 * b + 8), epoch=0)
        hits[ids] += 1
    rate = hits[min_id:] / batches
    want = -math.expm1(m * math.log1p(-1 / population))  # 1 - (39/40)^30 = 0.532
    # every item at the expected rate (binomial s.d. ~0.008), and not at the with-repeats one
    assert np.abs(rate - want).max() < 0.04
    assert abs(rate.mean() - want) < 0.005 and abs(m / population - want) > 0.2
    assert hits[:min_id].sum() == 0


def test_a_querys_history_leaves_its_negatives() -> None:
    """exclude_history_from_loss: the loss equals the written-out one over the negatives that
    are not in the query's own history (its target kept)."""
    from hstu.ops.losses.full_corpus import HistoryWindow

    torch.manual_seed(1)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 6, dtype=torch.float64), dim=1)
    # one sample, items 5 4 9 2: queries at 5 (-> 4), 4 (-> 9), 9 (-> 2)
    items = torch.tensor([5, 4, 9, 2])
    queries, pos_ids = unit(3), items[1:]
    vectors = {int(i): v for i, v in zip(items, unit(4))}
    pos_vectors = torch.stack([vectors[int(i)] for i in pos_ids])
    key_ids = torch.tensor([3, 5, 7])
    key_vectors = torch.stack([vectors[5] if int(i) == 5 else unit(1)[0] for i in key_ids])
    window = HistoryWindow(ids=items, starts=torch.zeros(3, dtype=torch.long),
                           lengths=torch.tensor([1, 2, 3]), width=3)
    x = LossInputs(queries, pos_ids, pos_vectors, 0.3, 8, True, None, 1, torch.float64,
                   key_ids=key_ids, key_vectors=key_vectors, population=12)
    x.history_mask = window
    loss, (_, neg_logits) = mixed_logq(x)
    inclusion = 1.0 - (11 / 12) ** 8
    negatives = [(pos_vectors[j], int(pos_ids[j])) for j in range(3)]
    negatives += [(key_vectors[j], int(key_ids[j])) for j in range(3)]
    total = 0.0
    for q in range(3):
        history = {int(i) for i in items[: q + 1]}
        log_q = lambda i: math.log(sum(int(b) == i for b in pos_ids) + inclusion)
        pos = float(queries[q] @ pos_vectors[q]) / 0.3 - log_q(int(pos_ids[q]))
        logits = [pos] + [float(queries[q] @ v) / 0.3 - log_q(i) for v, i in negatives
                          if i != int(pos_ids[q]) and i not in history]
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - pos
    assert float(loss) == pytest.approx(total / 3, rel=1e-12)
    # query 1 (history 5, 4; target 9): the drawn 5 and the in-batch 4 are out, 9 is its own
    assert torch.isneginf(neg_logits[1]).tolist() == [True, True, False, False, True, False]


def test_auto_sampling_follows_the_catalogue_and_says_why() -> None:
    from hstu.args import RetrievalArgs
    from hstu.data.sizes import AUTO_NEGATIVES, resolve_sampling
    from hstu.validation import ConfigError

    auto = RetrievalArgs(negative_sampling="auto", full_corpus_max_items=1000,
                         exclude_history_from_loss=True)
    small, line = resolve_sampling(auto, 1001, 1, dynamic=False)  # 1000 items
    assert (small.negative_sampling, small.num_negatives) == ("full_corpus", -1)
    assert "exact softmax: 1000 items" in line
    large, line = resolve_sampling(auto, 1002, 1, dynamic=False)
    assert (large.negative_sampling, large.num_negatives) == ("mixed_logq", AUTO_NEGATIVES)
    assert large.exclude_history_from_loss and "1001 items, more than" in line
    drawn, _ = resolve_sampling(RetrievalArgs(negative_sampling="auto", num_negatives=64,
                                              full_corpus_max_items=10), 50, 1, dynamic=False)
    assert (drawn.negative_sampling, drawn.num_negatives) == ("mixed_logq", 64)
    live, line = resolve_sampling(auto, 50, 1, dynamic=True)
    assert live.negative_sampling == "sampled_live" and "dynamic" in line
    fixed = RetrievalArgs(negative_sampling="uniform", num_negatives=8)
    assert resolve_sampling(fixed, 10**6, 1, dynamic=False) == (fixed, None)
    # a choice that refuses another field: one line naming it, and what "auto" chose
    dtype = RetrievalArgs(negative_sampling="auto", full_corpus_matmul_dtype="bfloat16",
                          full_corpus_max_items=10)
    with pytest.raises(ConfigError) as err:
        resolve_sampling(dtype, 50, 1, dynamic=False)
    assert "full_corpus_matmul_dtype" in str(err.value) and "chose 'mixed_logq'" in str(err.value)
