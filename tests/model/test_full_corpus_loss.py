"""The full-corpus retrieval loss around the fused softmax (hstu/ops/losses/full_corpus.py):
``full_corpus_loss`` against cross-entropy over the whole corpus, the history window against a
set per query on windows of every shape, the dtype choice, and the spare buffer the fused loss
hands from a backward to the next forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hstu.ops.losses.full_corpus as fc
from hstu.ops.losses import HistoryWindow, full_softmax_loss
from hstu.ops.losses.full_corpus import full_corpus_loss, resolve_matmul_dtype


def _inputs(q: int, i: int, d: int = 6, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(q, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    corpus = F.normalize(torch.randn(i, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return queries, corpus, g


# ------------------------------------------------------------------------ full_corpus_loss
@pytest.mark.parametrize("q", [1, 5])
def test_the_loss_is_the_mean_cross_entropy_over_the_corpus(q):
    """Item ids from min_item_id = 3: column c is item c + 3; the temperature divides the
    logits; the mean over queries (and scale instead of 1 / Q when given); out of training,
    the logits with -inf at each query's positive. D = 6 differs from Q: a mean over the
    wrong dimension shows."""
    queries, corpus, g = _inputs(q, 9)
    pos_ids = torch.randint(0, 9, (q,), generator=g) + 3
    logits = queries.double() @ corpus.double().t() / 0.2
    want = F.cross_entropy(logits, pos_ids - 3, reduction="sum")
    kw = {"temperature": 0.2, "min_item_id": 3, "matmul_dtype": None}
    loss, (pos, neg) = full_corpus_loss(queries, pos_ids, corpus, training=True, **kw)
    torch.testing.assert_close(loss.double(), want / q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pos.double(), logits.gather(1, (pos_ids - 3)[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)
    assert neg is None  # nothing reads a training step's [Q, I] logits
    scale = torch.tensor(0.125)
    loss, (_, neg) = full_corpus_loss(queries, pos_ids, corpus, training=False, scale=scale, **kw)
    torch.testing.assert_close(loss.double(), want * 0.125, rtol=1e-5, atol=1e-6)
    ref = logits.clone()
    ref[torch.arange(q), pos_ids - 3] = float("-inf")
    assert neg.shape == (q, 9)
    assert torch.equal(torch.isinf(neg), torch.isinf(ref)) and (neg[torch.isinf(neg)] < 0).all()
    torch.testing.assert_close(neg.double(), ref, rtol=1e-5, atol=1e-5)


def test_no_queries_is_a_zero_loss_with_a_gradient():
    queries, corpus, _ = _inputs(0, 9)
    queries.requires_grad_()
    loss, (pos, neg) = full_corpus_loss(queries, torch.zeros(0, dtype=torch.long), corpus,
                                        temperature=0.2, min_item_id=1, matmul_dtype=None,
                                        training=False)
    assert float(loss.detach()) == 0.0 and pos.shape == (0,) and neg.shape == (0, 9)
    loss.backward()
    assert queries.grad.shape == (0, 6)


def test_the_bfloat16_matmul_reaches_the_fused_loss():
    queries, corpus, g = _inputs(7, 40, d=16)
    pos_ids = torch.randint(1, 41, (7,), generator=g)
    kw = {"temperature": 0.05, "min_item_id": 1, "training": True}
    got, _ = full_corpus_loss(queries, pos_ids, corpus, matmul_dtype=torch.bfloat16, **kw)
    fused, _ = full_softmax_loss(queries / 0.05, corpus, pos_ids - 1, torch.bfloat16)
    exact, _ = full_corpus_loss(queries, pos_ids, corpus, matmul_dtype=None, **kw)
    assert torch.equal(got, fused / 7)
    assert not torch.equal(got, exact)  # the rounding is there: the dtype was not dropped


def test_a_corpus_of_another_dtype_is_cast_to_the_queries():
    queries, corpus, g = _inputs(4, 10)
    target = torch.randint(0, 10, (4,), generator=g)
    loss, _ = full_softmax_loss(queries, corpus.double(), target)
    assert loss.dtype == torch.float32
    want = F.cross_entropy(queries @ corpus.t(), target, reduction="sum")
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError) as err:
        full_softmax_loss(queries.double(), corpus, target, torch.bfloat16)
    assert str(err.value) == ("full-corpus softmax: a torch.bfloat16 matmul on torch.float64 "
                              "inputs is not supported (bfloat16 on float32 only)")


# --------------------------------------------------------------------------- matmul dtype
def test_the_matmul_dtype_as_configured_or_from_the_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_matmul_dtype("float32", cpu) == (torch.float32, "as configured")
    assert resolve_matmul_dtype("bfloat16", cpu) == (torch.bfloat16, "as configured")
    with pytest.raises(ValueError) as err:
        resolve_matmul_dtype("fp16", cpu)
    assert str(err.value) == ("full_corpus_matmul_dtype 'fp16' is not one of "
                              "auto, float32, bfloat16")
    asked = []
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        def probe(device, native=native):
            asked.append(device)
            return native, f"probe {native}"
        monkeypatch.setattr(fc, "native_bfloat16_matmul", probe)
        assert resolve_matmul_dtype("auto", cpu) == (want, f"auto: probe {native}")
    assert asked == [cpu, cpu]


# ------------------------------------------------------------------------- history window
def _window_reference(logits, window, start, target):
    """-inf at each row's history columns, a Python set per row (never its target; ids outside
    [0, I) ignored)."""
    out = logits.clone()
    for r in range(logits.shape[0]):
        s, n = int(window.starts[start + r]), int(window.lengths[start + r])
        for col in set(window.ids[s : s + n].tolist()) - {int(target[r])}:
            if 0 <= col < logits.shape[1]:
                out[r, col] = float("-inf")
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("elements", [3, 1 << 16])
@pytest.mark.parametrize("path", ["_mask_pairs_", "_mask_window_"])
def test_windows_of_any_layout_mask_exactly_their_items(monkeypatch, seed, elements, path):
    """Histories anywhere in the ids (overlapping, ending at the last id, followed by items
    that are not the target), ids outside the corpus on both sides, float64 logits, a block
    that starts past row 0, a target outside the columns (another rank's), and windows or
    pair lists of 3 entries (many steps); both ways of masking (the pairs on a CPU, the
    window elsewhere), into contiguous logits and into a strided view."""
    monkeypatch.setattr(fc, "_WINDOW_ELEMENTS", elements)
    monkeypatch.setattr(fc, "_PAIR_ELEMENTS", elements)
    g = torch.Generator().manual_seed(seed)
    num_i, n, rows = 7, 25, 12
    ids = torch.randint(-2, num_i + 2, (n,), generator=g)
    lengths = torch.randint(0, 6, (rows + 3,), generator=g)
    starts = torch.randint(0, n, (rows + 3,), generator=g).minimum(n - lengths)
    starts[-1], lengths[-1] = n - 4, 4  # a history that ends at the last id
    window = HistoryWindow(ids, starts, lengths, int(lengths.max()))
    target = torch.randint(0, num_i, (rows,), generator=g)
    target[1] = -1
    for strided in (False, True):
        wide = torch.randn(rows, 2 * num_i, generator=g, dtype=torch.float64)
        logits = wide[:, ::2] if strided else wide[:, :num_i].contiguous()
        want = _window_reference(logits, window, 3, target)
        getattr(window, path)(logits, 3, target)
        assert torch.equal(logits, want)
        assert logits.isinf().sum() > 0  # the case masks something


def test_a_cpu_masks_from_the_pairs_and_other_devices_from_the_window(monkeypatch):
    calls = []
    for name in ("_mask_pairs_", "_mask_window_"):
        monkeypatch.setattr(HistoryWindow, name,
                            lambda self, logits, *a, name=name: calls.append((name, logits.device.type)))
    window = HistoryWindow(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]), 1)
    window.mask_(torch.zeros(1, 2), 0, torch.tensor([0]))
    window.mask_(torch.zeros(1, 2, device="meta"), 0, torch.tensor([0], device="meta"))
    assert calls == [("_mask_pairs_", "cpu"), ("_mask_window_", "meta")]


@pytest.mark.parametrize("path", ["_mask_pairs_", "_mask_window_"])
def test_edge_windows(monkeypatch, path):
    """Width 0, no ids, no rows: nothing changes; width 1 masks the one item; a corpus of one
    column, whose item the history holds where the target is not (both ways of masking)."""
    monkeypatch.setattr(HistoryWindow, "mask_", getattr(HistoryWindow, path))
    logits = torch.zeros(2, 3)
    target = torch.tensor([0, 0])
    ids, starts = torch.tensor([2, 1]), torch.tensor([0, 1])
    HistoryWindow(ids, starts, torch.tensor([0, 0]), 0).mask_(logits, 0, target)
    HistoryWindow(torch.zeros(0, dtype=torch.long), starts, torch.tensor([1, 1]), 1).mask_(
        logits, 0, target)
    HistoryWindow(ids, starts, torch.tensor([1, 1]), 1).mask_(torch.zeros(0, 3), 0, target[:0])
    assert torch.equal(logits, torch.zeros(2, 3))
    HistoryWindow(ids, starts, torch.tensor([1, 1]), 1).mask_(logits, 0, target)
    assert logits.isinf().nonzero().tolist() == [[0, 2], [1, 1]]
    single = torch.zeros(3, 1)  # one column: row 0's history is it, rows 1 and 2 are empty
    window = HistoryWindow(torch.tensor([0, 5]), torch.tensor([0, 0, 1]), torch.tensor([1, 0, 1]), 1)
    window.mask_(single, 0, torch.tensor([1, 0, 0]))
    assert single[:, 0].tolist() == [float("-inf"), 0.0, 0.0]
    one = torch.zeros(1, 4)  # one id: its column is masked
    HistoryWindow(torch.tensor([3]), torch.tensor([0]), torch.tensor([1]), 1).mask_(
        one, 0, torch.tensor([0]))
    assert one.isinf().nonzero().tolist() == [[0, 3]]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_loss_builds_on_the_inputs_device(dtype):
    """The loss and its window run on the inputs' device (meta tensors here: most tensors made
    on the default device do not mix with them; CPU index tensors do, so the arange and zeros
    whose device the meta check cannot see are listed as equivalents)."""
    meta = torch.device("meta")
    q = torch.empty(5, 4, device=meta, requires_grad=True)
    c = torch.empty(7, 4, device=meta, requires_grad=True)
    target = torch.zeros(5, dtype=torch.long, device=meta)
    window = HistoryWindow(torch.zeros(6, dtype=torch.long, device=meta),
                           torch.zeros(5, dtype=torch.long, device=meta),
                           torch.ones(5, dtype=torch.long, device=meta), 2)
    loss, pos = full_softmax_loss(q, c, target, dtype, window)
    loss.backward()
    assert loss.device == pos.device == q.grad.device == c.grad.device == meta


# -------------------------------------------------------------------------- spare buffers
@pytest.fixture
def spare(monkeypatch):
    """An empty spare-buffer pool for the test."""
    pool: dict = {}
    monkeypatch.setattr(fc, "_SPARE", pool)
    return pool


def test_a_spare_buffer_is_kept_per_device_and_dtype_and_by_its_root(spare):
    cpu = torch.device("cpu")
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    root = torch.empty(40)
    fc._give_back(root)  # a tensor of its own
    assert spare[(cpu, torch.float32)] is not None
    assert spare[(cpu, torch.float32)].data_ptr() == root.data_ptr()
    other = fc._take_buffer(10, f64)  # another dtype: not the float32 buffer
    assert other.dtype == torch.float64 and other.data_ptr() != root.data_ptr()
    part = fc._take_buffer(40, f32)  # the whole spare, as a view of it
    assert part.data_ptr() == root.data_ptr() and part.numel() == 40
    assert (cpu, torch.float32) not in spare  # taken
    fc._give_back(part[:10].view(2, 5))  # a view: its root is kept, whole
    assert spare[(cpu, torch.float32)].numel() == 40
    assert spare[(cpu, torch.float32)].data_ptr() == root.data_ptr()
    fc._give_back(torch.empty(20))  # a smaller one does not replace it
    assert spare[(cpu, torch.float32)].data_ptr() == root.data_ptr()
    bigger = torch.empty(80)
    fc._give_back(bigger)  # a larger one does
    assert spare[(cpu, torch.float32)].data_ptr() == bigger.data_ptr()
    fresh = fc._take_buffer(100, f32)  # too small a spare: a new buffer, the spare dropped
    assert fresh.numel() == 100 and fresh.data_ptr() != bigger.data_ptr() and not spare


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_forward_without_gradients_gives_its_buffer_back_at_once(spare, dtype):
    queries, corpus, g = _inputs(6, 11)  # no input needs a gradient
    target = torch.randint(0, 11, (6,), generator=g)
    loss, _ = full_softmax_loss(queries, corpus, target, dtype)
    torch.testing.assert_close(loss, F.cross_entropy(queries @ corpus.t(), target, reduction="sum"),
                               rtol=1e-2 if dtype else 1e-5, atol=1e-3 if dtype else 1e-5)
    kept = next(iter(spare.values()))
    assert kept.numel() >= 6 * 11
    again, _ = full_softmax_loss(queries, corpus, target, dtype)  # on the same buffer
    assert torch.equal(again, loss) and next(iter(spare.values())).data_ptr() == kept.data_ptr()


def test_a_second_backward_is_refused_in_one_line():
    queries, corpus, g = _inputs(3, 5)
    queries.requires_grad_()
    loss, _ = full_softmax_loss(queries, corpus, torch.randint(0, 5, (3,), generator=g))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError) as err:
        loss.backward()
    assert str(err.value) == "the full-corpus softmax loss keeps its buffers for one backward only"
