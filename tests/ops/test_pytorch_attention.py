import math

import pytest
import torch

from hstu.ops import RelativeAttentionBias, hstu_attention
from hstu.ops.pytorch_attention import plan_chunks, pytorch_hstu_attention

from .reference import grads, naive_attention, random_case

LENGTHS = [23, 40, 7, 1]
CTX = [3, 2, 0, 0]
TGT = [5, 9, 2, 1]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rab", ["none", "pos", "pos+ts", "pos+ts+qt"])
@pytest.mark.parametrize("group", [1, 3])
def test_pytorch_matches_naive_reference(causal: bool, rab: str, group: int) -> None:
    case = random_case(
        LENGTHS, num_contextual=CTX, num_targets=TGT, rab=rab, max_positions=48, dtype=torch.float64
    )
    kw = {"alpha": 0.3, "scaling_seqlen": 40, "causal": causal, "target_group_size": group}
    got = hstu_attention(
        case.q,
        case.k,
        case.v,
        case.offsets,
        case.max_seqlen,
        num_contextual=case.num_contextual,
        num_targets=case.num_targets,
        rab=case.rab,
        **kw,
    )
    want = naive_attention(case, **kw)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(g_got, g_want)


def test_two_tokens_one_head_by_hand() -> None:
    # q, k, v of two tokens, one head, d = 2; alpha = 0.5, N = 4, causal, no bias.
    q = torch.tensor([[[1.0, 2.0]], [[0.5, -1.0]]], dtype=torch.float64)
    k = torch.tensor([[[0.0, 1.0]], [[2.0, 1.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0, 0.0]], [[3.0, -2.0]]], dtype=torch.float64)
    offsets = torch.tensor([0, 2])

    def silu(x: float) -> float:
        return x / (1.0 + math.exp(-x))

    # token 0 sees only itself: s00 = 0.5 * (1*0 + 2*1) = 1
    a00 = silu(1.0) / 4
    # token 1 sees 0 and 1: s10 = 0.5 * (0 - 1) = -0.5, s11 = 0.5 * (1 - 1) = 0
    a10, a11 = silu(-0.5) / 4, silu(0.0) / 4
    want = torch.tensor(
        [[[a00 * 1.0, a00 * 0.0]], [[a10 * 1.0 + a11 * 3.0, a10 * 0.0 + a11 * -2.0]]],
        dtype=torch.float64,
    )
    got = hstu_attention(q, k, v, offsets, 2, alpha=0.5, scaling_seqlen=4)
    torch.testing.assert_close(got, want)
    # a bias w_p[P - 1 + j - i] with P = 2 enters before the SiLU: w = [w(-1), w(0), w(+1)]
    rab = RelativeAttentionBias(torch.tensor([0.25, -1.0, 7.0], dtype=torch.float64))
    got = hstu_attention(q, k, v, offsets, 2, alpha=0.5, scaling_seqlen=4, rab=rab)
    b00, b10, b11 = silu(1.0 - 1.0) / 4, silu(-0.5 + 0.25) / 4, silu(0.0 - 1.0) / 4
    want = torch.tensor([[[0.0, 0.0]], [[b10 + 3 * b11, -2 * b11]]], dtype=torch.float64)
    want[0, 0, 0] = b00
    torch.testing.assert_close(got, want)


def _run(case, backend: str = "pytorch", **kw):
    return hstu_attention(
        case.q,
        case.k,
        case.v,
        case.offsets,
        case.max_seqlen,
        alpha=0.25,
        scaling_seqlen=case.max_seqlen,
        num_contextual=case.num_contextual,
        num_targets=case.num_targets,
        backend=backend,
        strict=True,
        **kw,
    )


def check_no_leakage(backend: str, device: str = "cpu") -> None:
    """Shared by the pytorch and triton tests: what the mask must block, and must not."""
    # one sample of 14: 2 contextual, 6 history, 6 candidates in groups of 2: [8,9] [10,11] [12,13]
    case = random_case([14], num_contextual=[2], num_targets=[6], device=device, seed=3)
    kw = {"target_group_size": 2}
    base = _run(case, backend, **kw).detach()

    def perturbed(rows: list[int]) -> torch.Tensor:
        with torch.no_grad():
            changed = random_case([14], num_contextual=[2], num_targets=[6], device=device, seed=3)
            for t in (changed.q, changed.k, changed.v):
                t[rows] += 5.0
        return _run(changed, backend, **kw).detach()

    # another group's candidates change: candidates 8, 9 (group 0) and all history unchanged
    out = perturbed([12, 13])
    torch.testing.assert_close(out[:12], base[:12], rtol=0, atol=0)
    assert not torch.allclose(out[12:], base[12:])
    # the earlier candidate of the same group changes: its group mate moves, others do not
    out = perturbed([10])
    assert not torch.allclose(out[11], base[11])
    torch.testing.assert_close(out[12:], base[12:], rtol=0, atol=0)
    torch.testing.assert_close(out[:10], base[:10], rtol=0, atol=0)
    # all candidates change: every history and contextual output unchanged
    out = perturbed(list(range(8, 14)))
    torch.testing.assert_close(out[:8], base[:8], rtol=0, atol=0)
    # a history token changes: contextual rows (which see only the contextual block) unchanged,
    # candidates (which see the history) move
    out = perturbed([5])
    torch.testing.assert_close(out[:2], base[:2], rtol=0, atol=0)
    assert not torch.allclose(out[8:], base[8:])
    # a later contextual token is visible to the first one (contextual block is bidirectional)
    out = perturbed([1])
    assert not torch.allclose(out[0], base[0])


def test_pytorch_mask_blocks_leakage() -> None:
    check_no_leakage("pytorch")


@pytest.mark.parametrize("rab", ["none", "pos", "pos+time"])
def test_hidden_pairs_pass_exactly_no_gradient(rab: str) -> None:
    """The by-hand path hides a pair by its score (SiLU's value and derivative underflow to
    0 there): the gradient of the history rows' outputs w.r.t. the candidates' q, k, v is
    exactly 0, with or without a bias added to the same scores, even for huge keys."""
    case = random_case([14, 9], num_contextual=[2, 0], num_targets=[6, 3], rab=rab,
                       max_positions=16, dtype=torch.float64)
    with torch.no_grad():
        case.k[8:14] *= 1e6  # the first sample's candidates: scores far from 0
    out = hstu_attention(case.q, case.k, case.v, case.offsets, case.max_seqlen, alpha=0.25,
                         scaling_seqlen=14, num_contextual=case.num_contextual,
                         num_targets=case.num_targets, target_group_size=2, rab=case.rab)
    gq, gk, gv = torch.autograd.grad(out[:8].pow(2).sum(), (case.q, case.k, case.v))
    for g in (gq, gk, gv):
        assert torch.equal(g[8:14], torch.zeros_like(g[8:14]))
        assert g[:8].abs().sum() > 0


def test_chunking_by_length_and_heads_gives_the_same_result() -> None:
    case = random_case(
        [30, 5, 17, 30, 2],
        num_heads=4,
        num_contextual=[1, 0, 2, 3, 0],
        num_targets=[4, 1, 3, 0, 1],
        rab="pos+ts",
        dtype=torch.float64,
    )
    kw = {
        "alpha": 0.2,
        "scaling_seqlen": 30,
        "num_contextual": case.num_contextual,
        "num_targets": case.num_targets,
        "target_group_size": 2,
        "rab": case.rab,
    }
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    one_chunk = pytorch_hstu_attention(*args, **kw)
    # 16 bytes * 30^2 per head: under this budget the 30-token samples run in row blocks
    tiny = pytorch_hstu_attention(*args, memory_budget_bytes=2 * 16 * 30 * 30, **kw)
    torch.testing.assert_close(tiny, one_chunk)
    for a, b in zip(grads(tiny, case.leaves()), grads(one_chunk, case.leaves())):
        torch.testing.assert_close(a, b)


def test_plan_chunks_respects_budget() -> None:
    lengths = [100, 3, 50, 0, 100, 10]
    budget = 2 * 2 * 16 * 100 * 100  # two samples of 100 tokens, 2 heads
    chunks = plan_chunks(lengths, num_heads=2, memory_budget_bytes=budget)
    seen = sorted(s for samples, *_ in chunks for s in samples)
    assert seen == [0, 1, 2, 4, 5]  # every non-empty sample exactly once
    for samples, width, blocked in chunks:
        assert width == max(lengths[s] for s in samples)
        assert min(lengths[s] for s in samples) > 0.5 * width  # bounded padding waste
        assert len(samples) * 2 * 16 * width * width <= budget
        assert not blocked
    assert [samples for samples, *_ in chunks] == [[0, 4], [2], [5], [1]]
    # a single sample whose scores reach the budget is computed alone, in row blocks
    chunks = plan_chunks([100, 20], num_heads=4, memory_budget_bytes=4 * 16 * 100 * 100)
    assert chunks == [([0], 100, True), ([1], 20, False)]
    # with a window, a sample longer than WINDOW_BLOCKED_MIN (3) windows and than
    # WINDOW_BLOCKED_MIN_LENGTH tokens too; a shorter one stays in a chunk (band blocks)
    chunks = plan_chunks([1100, 20], num_heads=4, memory_budget_bytes=2**30, max_attn_len=33)
    assert chunks == [([0], 1100, True), ([1], 20, False)]
    chunks = plan_chunks([100, 60], num_heads=4, memory_budget_bytes=2**30, max_attn_len=33)
    assert chunks == [([0, 1], 100, False)]


def test_empty_samples_and_bad_rab_are_handled() -> None:
    case = random_case([0, 4, 0, 3], rab="pos", max_positions=4)
    out = _run(case, rab=case.rab)
    assert out.shape == case.q.shape and torch.isfinite(out).all()
    small = RelativeAttentionBias(torch.zeros(5))  # P = 3 < max_seqlen = 4
    with pytest.raises(ValueError, match="P=3"):
        _run(case, rab=small)
    with pytest.raises(ValueError, match="together"):
        _run(case, rab=RelativeAttentionBias(torch.zeros(7), torch.zeros(129), None))


@pytest.mark.parametrize("ctx, rab", [([3, 2], "pos+ts"), ([20, 18], "pos+ts"), ([3, 2], "pos+ts+qt")])
def test_causal_split_of_wide_chunks_matches_reference(ctx, rab) -> None:
    """Causal chunks of width >= 32 skip the scores of rows [0, n/2) against keys [n/2, n);
    contextual tokens see each other both ways, so a chunk whose contextual block is wider than
    n/2 must not be split. Both against the naive reference, values and gradients."""
    from hstu.ops import pytorch_attention as pa

    lengths = [34, 33]
    case = random_case(lengths, num_contextual=ctx, num_targets=[4, 6], rab=rab,
                       max_positions=40, dtype=torch.float64)
    kw = {"alpha": 0.3, "scaling_seqlen": 40, "causal": True, "target_group_size": 2}
    got = pytorch_hstu_attention(case.q, case.k, case.v, case.offsets, case.max_seqlen,
                                 num_contextual=case.num_contextual, num_targets=case.num_targets,
                                 rab=case.rab, **kw)
    (chunk,) = pa._PLAN_CACHE[0][2]
    assert chunk.split == (17 if ctx == [3, 2] else 0)  # the guard, not only the result
    want = naive_attention(case, **kw)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(g_got, g_want)


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """(fn's output, bytes of the float tensors autograd saved for backward while it ran)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.is_floating_point():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("rab", ["none", "pos+ts"])
def test_chunks_over_the_budget_together_are_recomputed_in_backward(monkeypatch, rab: str) -> None:
    # 8 samples of 48 tokens, 2 heads of 4 dims: one sample's dense scores (16 B x 48^2 x 2 =
    # 72 KiB) fit the 100 KiB budget, so no sample runs in row blocks; together they keep more
    import hstu.ops.pytorch_attention as pa

    budget = 100 * 1024
    case = random_case([48] * 8, head_dim=4, num_contextual=[2] * 8, num_targets=[3] * 8, rab=rab,
                       max_positions=48)
    kw = {"alpha": 0.2, "scaling_seqlen": 48, "num_contextual": case.num_contextual,
          "num_targets": case.num_targets, "rab": case.rab, "memory_budget_bytes": budget}
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    out, saved = _saved_bytes(lambda: pytorch_hstu_attention(*args, **kw))
    monkeypatch.setattr(pa, "_recomputed_scores_times_v", pa._scores_times_v)
    kept, saved_kept = _saved_bytes(lambda: pytorch_hstu_attention(*args, **kw))
    assert saved_kept > 2 * budget > 3 * saved, (saved, saved_kept)
    # the same ops again in backward: the same values, bit for bit
    assert torch.equal(out, kept)
    for a, b in zip(grads(out, case.leaves()), grads(kept, case.leaves())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dense_chunks_by_hand_match_the_same_chunks_through_autograd(dtype) -> None:
    """A batch of dense chunks runs in one autograd function (layout and gradients by hand);
    the same chunks through autograd's ops (the path of batches with row blocks) must give the
    same values and gradients, chunked and causally split alike, and the function must be the
    one that ran (a batch that silently took the other path would pass the value check)."""
    import hstu.ops.pytorch_attention as pa

    # widths 40 (split: >= CAUSAL_SPLIT_MIN_WIDTH) and 12 (not), an empty sample between
    case = random_case([40, 33, 0, 12, 7], num_heads=3, num_contextual=[2, 1, 0, 0, 1],
                       num_targets=[3, 2, 0, 1, 0], rab="pos+ts+qt", max_positions=40,
                       dtype=dtype, seed=5)
    kw = {"alpha": 0.3, "scaling_seqlen": 45, "causal": True, "num_contextual": case.num_contextual,
          "num_targets": case.num_targets, "rab": case.rab}
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    by_hand = pytorch_hstu_attention(*args, **kw)
    assert type(by_hand.grad_fn).__name__ == "_DenseChunksAttentionBackward"
    chunks = pa._PLAN_CACHE[0][2]
    assert [c.split for c in chunks] == [20, 0] and all(c.blocked is None for c in chunks)
    through_autograd = pytorch_hstu_attention(*args, dense_by_hand=False, **kw)
    assert pa._PLAN_CACHE[0][2] is chunks  # the same chunks (the plan is cached per batch)
    assert type(through_autograd.grad_fn).__name__ != "_DenseChunksAttentionBackward"
    assert by_hand.dtype == dtype and by_hand.shape == case.q.shape
    tol = {} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(by_hand, through_autograd, **tol)
    got, want = grads(by_hand, case.leaves()), grads(through_autograd, case.leaves())
    assert len(got) == 5
    for g_got, g_want in zip(got, want):
        assert g_got.dtype == dtype
        torch.testing.assert_close(g_got, g_want, **tol)


def test_tokens_past_the_last_offset_get_zeros_by_hand_too() -> None:
    """q, k, v longer than offsets[B] (the caller's padding): those rows of the output and of
    the gradients are 0 on both paths, never the memory an empty buffer held."""
    case = random_case([9, 5], num_heads=2, rab="pos+ts", max_positions=12, dtype=torch.float64)
    pad = 3
    q, k, v = (torch.cat([x.detach(), torch.randn(pad, *x.shape[1:], dtype=x.dtype)]).requires_grad_()
               for x in (case.q, case.k, case.v))
    stamps = torch.cat([case.rab.timestamps, case.rab.timestamps[-1:].repeat(pad)])
    rab = RelativeAttentionBias(case.rab.pos_weights, case.rab.ts_weights, stamps)
    for by_hand in (True, False):
        out = pytorch_hstu_attention(q, k, v, case.offsets, case.max_seqlen, alpha=0.5,
                                     scaling_seqlen=12, rab=rab, dense_by_hand=by_hand)
        assert torch.equal(out[-pad:], torch.zeros_like(out[-pad:]))
        dq, dk, dv = grads(out, [q, k, v])
        for g in (dq, dk, dv):
            assert torch.equal(g[-pad:], torch.zeros_like(g[-pad:]))
