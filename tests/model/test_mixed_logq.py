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
