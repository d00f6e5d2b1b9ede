"""The fused full-corpus softmax loss against the plain autograd formula."""

import pytest
import torch
import torch.nn.functional as F

import hstu.ops.losses.full_corpus as retrieval
from hstu.ops.losses import HistoryWindow, full_softmax_loss


def _case(q: int, i: int, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    queries = (F.normalize(torch.randn(q, d, generator=g), dim=1) / 0.05).requires_grad_()
    corpus = F.normalize(torch.randn(i, d, generator=g), dim=1).requires_grad_()
    target = torch.randint(0, i, (q,), generator=g)
    return queries, corpus, target


def _reference(queries, corpus, target):
    q = queries.detach().clone().requires_grad_()
    c = corpus.detach().clone().requires_grad_()
    logits = q @ c.t()
    loss = F.cross_entropy(logits, target, reduction="sum")
    (loss * 0.3).backward()
    return loss.detach(), logits.gather(1, target[:, None]).squeeze(1).detach(), q.grad, c.grad


@pytest.mark.parametrize("block", [7, 1 << 18])
def test_matches_cross_entropy_and_its_gradients(monkeypatch, block):
    # block 7 elements: one query per block, so the blocked loops and their edges are used
    monkeypatch.setattr(retrieval, "_FULL_SOFTMAX_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(retrieval, "_FULL_SOFTMAX_MIN_ROWS", 1)
    queries, corpus, target = _case(37, 23)
    want_loss, want_pos, want_gq, want_gc = _reference(queries, corpus, target)
    for _ in range(2):  # the second call runs on the buffer the first one gave back
        queries.grad = corpus.grad = None
        loss, pos = full_softmax_loss(queries, corpus, target)
        (loss * 0.3).backward()
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(pos, want_pos)
        torch.testing.assert_close(queries.grad, want_gq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(corpus.grad, want_gc, rtol=1e-5, atol=1e-5)
        assert not pos.requires_grad


def test_a_larger_spare_buffer_serves_a_smaller_batch():
    big = _case(50, 40, seed=1)
    loss, _ = full_softmax_loss(*big)
    loss.backward()
    small = _case(9, 40, seed=2)
    want = _reference(*small)
    loss, _ = full_softmax_loss(*small)
    (loss * 0.3).backward()
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(small[1].grad, want[3], rtol=1e-5, atol=1e-5)


def test_no_grad_forward_and_a_second_backward():
    queries, corpus, target = _case(5, 8)
    with torch.no_grad():
        loss, _ = full_softmax_loss(queries, corpus, target)
    torch.testing.assert_close(loss, _reference(queries, corpus, target)[0], rtol=1e-5, atol=1e-4)
    loss, _ = full_softmax_loss(queries, corpus, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_extreme_logits_stay_finite():
    """Temperature 0.001: logits of +-1000 overflow a naive exp; the loss stays exact."""
    queries, corpus, target = _case(6, 9)
    q = (queries.detach() * 0.05 / 0.001).requires_grad_()
    loss, _ = full_softmax_loss(q, corpus, target)
    loss.backward()
    want = F.cross_entropy(q.detach() @ corpus.detach().t(), target, reduction="sum")
    assert torch.isfinite(q.grad).all()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-3)


def _aligned_case(q: int, i: int, pull: float, d: int = 16, seed: int = 3):
    """Queries pulled towards their targets' vectors: pull 0.15 gives a loss of ~12 nats per
    query (an untrained model), 3.0 one of ~0.02 (p(target) ~ 0.98: tiny gradients)."""
    g = torch.Generator().manual_seed(seed)
    corpus = F.normalize(torch.randn(i, d, generator=g), dim=1)
    target = torch.randint(0, i, (q,), generator=g)
    queries = F.normalize(F.normalize(torch.randn(q, d, generator=g), dim=1) + pull * corpus[target], dim=1)
    return queries / 0.05, corpus, target


@pytest.mark.parametrize("pull", [0.15, 3.0])
def test_bfloat16_matmuls_stay_close_to_float32(pull):
    """The bfloat16 variant against the float32 one on the same inputs: the loss within 5e-4
    relative plus 1e-4 nats per query even when it is tiny (the target's column of the
    softmax is the exact logit; from the rounded matmul it was 11 % off at pull 3), the target logits exact,
    and every query's gradient within 8 % of its norm even when p(target) ~ 1 (P - onehot is
    formed before rounding; rounding after it gives errors of ~100 % on those rows). The
    gradients must also differ from float32 (> 1e-4): the matmuls really ran in bfloat16."""
    queries, corpus, target = _aligned_case(300, 500, pull)
    got = {}
    for dtype in (None, torch.bfloat16):
        q = queries.clone().requires_grad_()
        c = corpus.clone().requires_grad_()
        loss, pos = full_softmax_loss(q, c, target, dtype)
        (loss * 0.7).backward()
        got[dtype] = loss.detach(), pos, q.grad, c.grad
    want, bf = got[None], got[torch.bfloat16]
    torch.testing.assert_close(bf[0], want[0], rtol=5e-4, atol=1e-4 * len(target))
    torch.testing.assert_close(bf[1], want[1], rtol=1e-6, atol=1e-5)
    row_err = (bf[2] - want[2]).norm(dim=1) / want[2].norm(dim=1)
    assert row_err.max() < 0.08, row_err.max()
    table_err = (bf[3] - want[3]).norm() / want[3].norm()
    assert 1e-4 < table_err < 0.02, table_err
    assert row_err.median() > 1e-4


def test_bfloat16_extreme_logits_and_refusals():
    queries, corpus, target = _case(6, 9)
    q = (queries.detach() * 0.05 / 0.001).requires_grad_()
    loss, _ = full_softmax_loss(q, corpus, target, torch.bfloat16)
    loss.backward()
    want = F.cross_entropy(q.detach() @ corpus.detach().t(), target, reduction="sum")
    assert torch.isfinite(q.grad).all() and torch.isfinite(corpus.grad).all()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-3, atol=0.5)
    with pytest.raises(ValueError, match="bfloat16 on float32 only"):
        full_softmax_loss(q.double(), corpus.double(), target, torch.bfloat16)


def test_bfloat16_and_float32_buffers_alternate():
    """The spare buffers are kept per dtype: a bfloat16 step between float32 steps changes
    nothing in the float32 results."""
    queries, corpus, target = _case(20, 30)
    want = _reference(queries, corpus, target)
    for dtype in (None, torch.bfloat16, None):
        queries.grad = corpus.grad = None
        loss, _ = full_softmax_loss(queries, corpus, target, dtype)
        (loss * 0.3).backward()
        if dtype is None:
            torch.testing.assert_close(corpus.grad, want[3], rtol=1e-5, atol=1e-5)


def _masked_case(q: int, i: int, seed: int = 3):
    """Queries of samples with repeated history items (ids 0..i-1 as columns), as the model
    asks: query j of a sample leaves out the sample's items 0..j."""
    g = torch.Generator().manual_seed(seed)
    queries, corpus, _ = _case(q, i, seed=seed)
    lengths = [q // 3 + 1, q - q // 3 + 1]  # two samples of H items: sum(H - 1) = q queries
    ids = torch.randint(0, max(2, i // 3), (sum(lengths),), generator=g)  # many repeats
    starts, within, target = [], [], []
    offset = 0
    for h in lengths:
        for j in range(h - 1):
            starts.append(offset)
            within.append(j + 1)
            target.append(int(ids[offset + j + 1]))
        offset += h
    window = HistoryWindow(ids, torch.tensor(starts), torch.tensor(within), max(lengths) - 1)
    return queries, corpus, torch.tensor(target), window


def _masked_reference(queries, corpus, target, window):
    """The masked softmax materialised: for each query, a Python set of its history's ids."""
    q = queries.detach().clone().requires_grad_()
    c = corpus.detach().clone().requires_grad_()
    logits = q @ c.t()
    mask = torch.zeros(logits.shape, dtype=torch.bool)
    for row in range(len(target)):
        s, n = int(window.starts[row]), int(window.lengths[row])
        for item in set(window.ids[s : s + n].tolist()) - {int(target[row])}:
            mask[row, item] = True
    loss = F.cross_entropy(logits.masked_fill(mask, float("-inf")), target, reduction="sum")
    (loss * 0.3).backward()
    return loss.detach(), q.grad, c.grad


@pytest.mark.parametrize("block", [7, 1 << 18])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("masked_blocks", [1, 3])
def test_masked_items_leave_the_softmax(monkeypatch, block, dtype, masked_blocks):
    # RetrievalArgs.exclude_history_from_loss: the masked logits are -inf, on every block
    # (and in windows or pair lists of 5 entries: several per block), masked a block at a
    # time or 3 at a time (the last run shorter)
    monkeypatch.setattr(retrieval, "_FULL_SOFTMAX_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(retrieval, "_FULL_SOFTMAX_MIN_ROWS", 1)
    monkeypatch.setattr(retrieval, "_WINDOW_ELEMENTS", 5)
    monkeypatch.setattr(retrieval, "_PAIR_ELEMENTS", 5)
    monkeypatch.setattr(retrieval, "_MASKED_BLOCKS", masked_blocks)
    queries, corpus, target, masked = _masked_case(37, 23)
    assert len(set(masked.ids.tolist())) < masked.ids.numel()  # repeated history items
    want_loss, want_gq, want_gc = _masked_reference(queries, corpus, target, masked)
    plain = _reference(queries, corpus, target)[0]
    assert want_loss < plain - 1.0  # the mask changes the loss: the test can tell
    loss, _ = full_softmax_loss(queries, corpus, target, dtype, masked)
    (loss * 0.3).backward()
    if dtype is None:
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(queries.grad, want_gq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(corpus.grad, want_gc, rtol=1e-5, atol=1e-5)
        return
    # bfloat16 matmuls: within rounding of the inputs (as the unmasked bfloat16 test)
    torch.testing.assert_close(loss, want_loss, rtol=5e-4, atol=1e-4 * len(target))
    for got, want in ((queries.grad, want_gq), (corpus.grad, want_gc)):
        assert float((got - want).norm() / want.norm()) < 0.02


def test_bfloat16_matmul_shapes_do_not_follow_the_query_count():
    """On a CPU the bfloat16 matmuls run through oneDNN, which caches a compiled kernel per
    shape: with one shape per query count the cache grew a process by ~2.5 MB a step. The
    queries are padded to whole blocks, so ten different query counts within one block count
    give the same three matmul shapes (forward block, two backward), and the padding changes
    no result (the loss, target logits and gradients of the real rows equal an unpadded
    float32-reference check as in the test above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: set[tuple] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out) and args[0].dtype == torch.bfloat16:
                shapes.add((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    num_items = 500
    block = retrieval._block_rows(num_items)
    for q in range(2 * block + 1, 2 * block + 11):
        queries, corpus, target = _aligned_case(q, num_items, 0.15)
        qq, cc = queries.clone().requires_grad_(), corpus.clone().requires_grad_()
        with Record():
            loss, _ = full_softmax_loss(qq, cc, target, torch.bfloat16)
            loss.backward()
        assert qq.grad.shape == queries.shape and torch.isfinite(qq.grad).all()
        ref_q = queries.clone().requires_grad_()
        ref_loss, _ = full_softmax_loss(ref_q, corpus.clone(), target, None)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=5e-4, atol=1e-4 * q)
        row_err = (qq.grad - ref_q.grad).norm(dim=1) / ref_q.grad.norm(dim=1)
        assert row_err.max() < 0.08
    assert len(shapes) == 3, sorted(shapes)
