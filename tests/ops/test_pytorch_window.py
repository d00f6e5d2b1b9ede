"""The pytorch backend's semi-local window (max_attn_len W, min_full_attn_seq_len M) and its
row-blocked path for long samples (recomputed in backward), against the naive reference."""

import pytest
import torch

from hstu import ops
from hstu.ops import hstu_attention
from hstu.ops import pytorch_attention as pa

from .reference import grads, naive_attention, random_case

LENGTHS = [40, 23, 9]
CTX = [3, 2, 0]
TGT = [5, 4, 2]


def _case(rab: str = "pos+ts", lengths=LENGTHS, ctx=CTX, tgt=TGT, seed: int = 0):
    return random_case(lengths, num_contextual=ctx, num_targets=tgt, rab=rab,
                       max_positions=48, dtype=torch.float64, seed=seed)


def _pytorch(case, **kw):
    return pa.pytorch_hstu_attention(
        case.q, case.k, case.v, case.offsets, case.max_seqlen, num_contextual=case.num_contextual,
        num_targets=case.num_targets, rab=case.rab, **kw)


def _blocked_chunks():
    return [c.blocked for c in pa._PLAN_CACHE[0][2] if c.blocked is not None]


def _check_against_reference(case, got, kw) -> None:
    kw = {k: v for k, v in kw.items() if k != "memory_budget_bytes"}
    want = naive_attention(case, **kw)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("convention", ["hstu", "peer"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window, full", [(3, 0), (4, 6), (14, 0)])
def test_window_matches_reference(monkeypatch, convention, causal, window, full) -> None:
    """W = 3, 4: the 40- and 23-token samples run alone in row blocks of 4 rows against the
    band, as samples of WINDOW_BLOCKED_MIN_LENGTH tokens do (W = 14: every sample is short
    against the window, one dense masked chunk)."""
    monkeypatch.setattr(pa, "MIN_BLOCK_ROWS", 4)
    monkeypatch.setattr(pa, "WINDOW_BLOCKED_MIN_LENGTH", 16)
    case = _case("pos+ts+qt" if causal else "pos+ts")
    kw = {"alpha": 0.3, "scaling_seqlen": 40, "causal": causal, "target_group_size": 2,
          "mask_convention": convention, "max_attn_len": window,
          "min_full_attn_seq_len": full}
    got = hstu_attention(case.q, case.k, case.v, case.offsets, case.max_seqlen,
                         num_contextual=case.num_contextual, num_targets=case.num_targets,
                         rab=case.rab, **kw)
    blocked = _blocked_chunks()
    # the guard: which samples take the band path
    assert [int(s.lengths[0]) for s in blocked] == [n for n in LENGTHS if n > pa.WINDOW_BLOCKED_MIN * window]
    for spec in blocked:
        assert len(spec.blocks) > 3
        # the band: a windowed block sees fewer keys than the sample has
        assert min(len(b.key_pos) for b in spec.blocks) < int(spec.lengths[0]) // 2
    assert all(s.cached for s in blocked)
    _check_against_reference(case, got, kw)


BAND_LENGTHS = [64, 50, 40, 35]


@pytest.mark.parametrize("convention", ["hstu", "peer"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ctx, tgt, full", [([0, 0, 0, 0], [0, 0, 0, 0], 0), ([3, 0, 2, 1], [4, 2, 0, 3], 5)])
@pytest.mark.parametrize("cached", [True, False])
def test_windowed_chunk_in_band_blocks_matches_reference(monkeypatch, convention, causal, ctx, tgt, full, cached) -> None:
    """Samples short against the window stay batched in one chunk, computed in row blocks of
    W / 2 rows against the keys some sample's rows can see (the band, contextual tokens,
    candidates, the last M rows), recomputed in backward: values and gradients (q, k, v,
    both bias tables) as the reference."""
    monkeypatch.setattr(pa, "BAND_MIN_ROWS", 4)
    if not cached:
        monkeypatch.setattr(pa, "_BLOCK_INDEX_CACHE_FRACTION", 10**12)
    case = random_case(BAND_LENGTHS, num_contextual=ctx, num_targets=tgt,
                       rab="pos+ts+qt" if causal else "pos+ts", max_positions=64,
                       dtype=torch.float64, seed=3)
    window = 8
    kw = {"alpha": 0.3, "scaling_seqlen": 64, "causal": causal, "target_group_size": 2,
          "mask_convention": convention, "max_attn_len": window, "min_full_attn_seq_len": full}
    got = _pytorch(case, **kw)
    [chunk] = pa._PLAN_CACHE[0][2]  # longer than 3 W, but short: one chunk of 4 samples
    spec = chunk.blocked
    # the guard: row blocks of W / 2 rows, each against fewer keys than the chunk is wide
    assert spec is not None and spec.samples == 4 and spec.cached == cached
    assert [b.r1 - b.r0 for b in spec.blocks] == [window // 2] * 16
    work = sum((b.r1 - b.r0) * len(b.key_pos) for b in spec.blocks)
    assert work <= pa.BAND_MAX_WORK * 64 * 64
    if not any(ctx) and not full:  # the band alone: W keys back (and W ahead, non-causal)
        assert max(len(b.key_pos) for b in spec.blocks) == window // 2 + window * (1 if causal else 2)
    _check_against_reference(case, got, kw)


def test_band_blocks_not_taken_when_they_save_little() -> None:
    """A window nearly as wide as the samples: the dense path's causal split, bitwise as
    without a window (the window then masks nothing)."""
    case = random_case(BAND_LENGTHS, rab="pos+ts", max_positions=64, dtype=torch.float64, seed=4)
    kw = {"alpha": 0.3, "scaling_seqlen": 64, "causal": True}
    got = _pytorch(case, max_attn_len=64, **kw)
    [chunk] = pa._PLAN_CACHE[0][2]
    assert chunk.blocked is None and chunk.split == 32 and len(chunk.parts) == 2
    assert torch.equal(got, _pytorch(case, **kw))


@pytest.mark.parametrize("causal", [True, False])
def test_window_wider_than_the_sample_is_full_attention(monkeypatch, causal) -> None:
    case = _case("pos+ts")
    kw = {"alpha": 0.3, "scaling_seqlen": 40, "causal": causal, "target_group_size": 2}
    full = _pytorch(case, **kw)
    wide = _pytorch(case, max_attn_len=40, **kw)
    assert torch.equal(wide, full)  # the same path, the same mask: bitwise
    full_grads = grads(full, case.leaves())
    for a, b in zip(grads(wide, case.leaves()), full_grads):
        assert torch.equal(a, b)
    # also in row blocks (a budget that blocks every sample)
    monkeypatch.setattr(pa, "MIN_BLOCK_ROWS", 4)
    blocked = _pytorch(case, max_attn_len=40, min_full_attn_seq_len=3,
                       memory_budget_bytes=1000, **kw)
    assert len(_blocked_chunks()) == 3
    torch.testing.assert_close(blocked, full)
    for a, b in zip(grads(blocked, case.leaves()), full_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("convention", ["hstu", "peer"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 3])
def test_bounded_memory_path_matches_reference(monkeypatch, convention, causal, window) -> None:
    """A budget far below the samples' scores: every sample alone, in row blocks recomputed
    in backward; values and gradients (q, k, v, both bias tables) as the reference. The
    block masks and indices are rebuilt at each use here (cached in the tests above)."""
    monkeypatch.setattr(pa, "MIN_BLOCK_ROWS", 4)
    monkeypatch.setattr(pa, "_BLOCK_INDEX_CACHE_FRACTION", 10**12)
    case = _case("pos+ts+qt", seed=2)
    kw = {"alpha": 0.3, "scaling_seqlen": 40, "causal": causal, "target_group_size": 3,
          "mask_convention": convention, "max_attn_len": window,
          "memory_budget_bytes": 1000}
    got = _pytorch(case, **kw)
    blocked = _blocked_chunks()
    assert len(blocked) == 3 and not any(s.cached for s in blocked)
    _check_against_reference(case, got, kw)


def _largest_saved(fn) -> int:
    """The most elements of any tensor autograd saves while ``fn`` runs."""
    largest = [0]

    def pack(t):
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return largest[0]


def test_recomputed_blocks_save_no_scores(monkeypatch) -> None:
    """One 256-token sample, one head: autograd keeps an [n, n] score tensor on the dense path,
    but nothing bigger than the inputs ([n, d]) once its blocks are recomputed."""
    monkeypatch.setattr(pa, "MIN_BLOCK_ROWS", 4)
    n, d = 256, 8
    case = random_case([n], num_heads=1, head_dim=d, rab="pos+ts", seed=4)
    kw = {"alpha": 0.3, "scaling_seqlen": n}
    dense = _largest_saved(lambda: _pytorch(case, **kw))
    assert dense >= n * n // 2 and not _blocked_chunks()
    budget = 5 * 4 * n * 32  # blocks of 32 rows: five float32 [32, n] tensors fit
    blocked = _largest_saved(lambda: _pytorch(case, memory_budget_bytes=budget, **kw))
    (spec,) = _blocked_chunks()
    assert len(spec.blocks) == n // 32
    assert blocked <= n * d


def test_dispatcher_validates_and_passes_the_window(monkeypatch) -> None:
    case = _case("none")
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    kw = {"alpha": 0.3, "scaling_seqlen": 40}
    with pytest.raises(ValueError, match="max_attn_len and min_full_attn_seq_len must be >= 0"):
        hstu_attention(*args, max_attn_len=-1, **kw)
    with pytest.raises(ValueError, match="needs max_attn_len > 0"):
        hstu_attention(*args, min_full_attn_seq_len=4, **kw)
    # the window reaches the pytorch kernel: samples beyond the window differ from full
    full = hstu_attention(*args, **kw)
    windowed = hstu_attention(*args, max_attn_len=2, **kw)
    assert not torch.allclose(windowed, full)
    # another backend gets the options as given (AttentionOptions' fields), the window too
    seen = {}

    def backend(q, k, v, offsets, max_seqlen, **options):
        seen.update(options)
        return q

    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **k: "cutlass")
    monkeypatch.setattr(ops, "load", lambda target: backend)
    hstu_attention(*args, backend="cutlass", max_attn_len=8, min_full_attn_seq_len=2, **kw)
    assert seen == {"max_attn_len": 8, "min_full_attn_seq_len": 2, **kw}


def test_dispatcher_passes_the_window_to_triton(triton_backend, device) -> None:
    """The triton kernel takes the window: the dispatcher hands it over (strict, no fallback),
    and the result is the pytorch backend's."""
    case = random_case([20, 9], num_contextual=[2, 0], num_targets=[3, 2], device=device)
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    kw = {"alpha": 0.3, "scaling_seqlen": 20, "num_contextual": case.num_contextual,
          "num_targets": case.num_targets, "max_attn_len": 3, "min_full_attn_seq_len": 2}
    got = hstu_attention(*args, backend="triton", strict=True, **kw)
    want = hstu_attention(*args, backend="pytorch", **kw)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, hstu_attention(*args, backend="pytorch", alpha=0.3,
                                                   scaling_seqlen=20,
                                                   num_contextual=case.num_contextual,
                                                   num_targets=case.num_targets))
