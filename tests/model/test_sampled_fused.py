"""The fused sampled softmax (``sampled_softmax_loss_shared``, the CPU training path of uniform
negatives) against the unfused reference (``sampled_softmax_loss``): loss and every gradient,
with accidental hits, positives that are not among the negatives, and a
query whose every negative is its positive."""

import pytest
import torch
import torch.nn.functional as F

import hstu.ops.losses.sampled as retrieval
from hstu.data.negatives import transpose_index
from hstu.ops.losses import (
    SharedRows,
    sampled_softmax_loss,
    sampled_softmax_loss_shared,
    strategies,
)


def _case(num_q: int, num_u: int, m: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    uniq = torch.sort(torch.randperm(5 * num_u, generator=g)[:num_u] + 1).values
    index = torch.randint(0, num_u, (num_q, m), generator=g)
    pos_ids = uniq[torch.randint(0, num_u, (num_q,), generator=g)]
    pos_ids[::3] = 5 * num_u + 7  # not among the negatives: nothing masked
    index[1, :2] = torch.searchsorted(uniq, pos_ids[1])  # two accidental hits in one row
    leaves = [torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True) for n in (num_q, num_u, num_q)]
    return uniq, index, pos_ids, leaves


def _run(fused: bool, uniq, index, pos_ids, leaves, scale, transpose: bool):
    for t in leaves:
        t.grad = None
    q, rows, pos = (F.normalize(t, dim=-1) for t in leaves)
    order = offsets = None
    if transpose:
        order, offsets = (torch.from_numpy(a) for a in transpose_index(index.numpy(), uniq.numel()))
    shared = SharedRows(rows, index, order, offsets)
    if fused:
        loss, pos_logits = sampled_softmax_loss_shared(q, pos, pos_ids, shared, uniq, 0.05, scale)
    else:
        neg_ids = uniq[index]
        loss, pos_logits, _ = sampled_softmax_loss(q, pos, pos_ids, shared, neg_ids, 0.05, scale)
    loss.backward()
    return loss.detach(), pos_logits.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_fused_sampled_softmax_equals_the_reference(transpose, scale):
    uniq, index, pos_ids, leaves = _case(num_q=23, num_u=40, m=16, d=8, seed=1)
    s = None if scale is None else torch.tensor(scale, dtype=torch.float64)
    want = _run(False, uniq, index, pos_ids, leaves, s, transpose)
    got = _run(True, uniq, index, pos_ids, leaves, s, transpose)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(got[2], want[2]):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_sampled_softmax_float32_matches_float64():
    uniq, index, pos_ids, leaves = _case(num_q=300, num_u=200, m=32, d=16, seed=2)
    want = _run(False, uniq, index, pos_ids, leaves, None, True)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    got = _run(True, uniq, index, pos_ids, leaves32, None, True)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)


def test_query_whose_every_negative_is_its_positive_contributes_nothing():
    uniq, index, pos_ids, leaves = _case(num_q=6, num_u=10, m=4, d=8, seed=3)
    pos_ids[2] = uniq[7]
    index[2] = 7  # all four negatives of query 2 are its positive
    want = _run(False, uniq, index, pos_ids, leaves, torch.tensor(1.0, dtype=torch.float64), True)
    got = _run(True, uniq, index, pos_ids, leaves, torch.tensor(1.0, dtype=torch.float64), True)
    assert torch.isfinite(got[0])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(got[2], want[2]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # query 2's own gradient is zero: its softmax is the positive alone
    assert leaves[0].grad is not None and got[2][0][2].abs().max() == 0


def test_model_training_step_takes_the_fused_path_with_the_same_loss_and_gradients(monkeypatch):
    from tests.model.helpers import make_batch, sampler
    from tests.model.test_models import _retrieval

    batch = make_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11]], negatives=sampler(num_negatives=8))
    calls = []
    fused = retrieval.sampled_softmax_loss_shared

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(strategies, "sampled_softmax_loss_shared", counting)
    results = []
    for use_fused in (True, False):
        if not use_fused:
            monkeypatch.setattr(strategies, "fused_sampled_loss_applies", lambda *_: False)
        model = _retrieval(8, use_collection=True)
        loss, (_pos_logits, neg_logits) = model(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        assert (neg_logits is None) == use_fused  # a fused training step keeps no [Q, M] logits
    assert len(calls) == 1
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # in eval mode the same forward returns the [Q, M] logits (the unfused path)
    model = _retrieval(8, use_collection=True).eval()
    with torch.no_grad():
        _, (_, neg_logits) = model(batch)
    assert neg_logits is not None and neg_logits.shape == (8, 8)
    assert len(calls) == 1


def test_pattern_products_equal_dense_products():
    g = torch.Generator().manual_seed(7)
    num_q, num_u, m, d = 9, 5, 6, 3
    index = torch.randint(0, num_u, (num_q, m), generator=g)
    w = torch.randn(num_q * m, generator=g, dtype=torch.float64)
    rows = torch.randn(num_u, d, generator=g, dtype=torch.float64)
    q = torch.randn(num_q, d, generator=g, dtype=torch.float64)
    dense = torch.zeros(num_q, num_u, dtype=torch.float64)
    dense.index_put_((torch.arange(num_q).repeat_interleave(m), index.reshape(-1)), w, accumulate=True)
    order, offsets = (torch.from_numpy(a) for a in transpose_index(index.numpy(), num_u))
    for o, off in ((order, offsets), (None, None)):
        gq, gr = retrieval._pattern_products(w, index.reshape(-1), m, rows, q, o, off, True, True)
        torch.testing.assert_close(gq, dense @ rows)
        torch.testing.assert_close(gr, dense.t() @ q)
