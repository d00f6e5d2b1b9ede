"""Semi-local attention (max_attn_len W, min_full_attn_seq_len M) in the triton kernels.

Values and gradients against the dense float64 reference (``reference.naive_attention``,
whose mask is ``tests.ops.reference.allowed`` pair by pair), and the tiles the kernels visit:
with 16-wide tiles every (query block, key block) pair a kernel loads is recorded through
its tile function and compared with the pairs that hold at least one allowed (row, key).
Interpreted on CPU (``TRITON_INTERPRET=1``), compiled on a GPU.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from hstu.ops.masks import dense_mask

from .reference import grads, naive_attention, random_case

# name: (lengths, contextual, candidates, group size, causal, W, M, rab, block_m, block_n)
# lengths up to 70 with 16-wide tiles: windows inside one tile (W = 3), spanning several
# (W = 21), the last-M full rows crossing a tile boundary, every kind of token.
CASES = {
    "plain-w3": ([70, 23, 7], None, None, 1, True, 3, 0, "none", 16, 16),
    "plain-w21-m9": ([70, 33, 1], None, None, 1, True, 21, 9, "none", 16, 16),
    "ctx-targets-w5": ([70, 41, 9], [3, 18, 0], [6, 5, 2], 2, True, 5, 0, "pos", 16, 16),
    "ctx-targets-w21-m7": ([66, 30, 12], [4, 2, 1], [9, 3, 4], 3, True, 21, 7, "none", 32, 16),
    "ctx-targets-w2-m30": ([64, 20], [17, 1], [5, 2], 1, True, 2, 30, "pos+ts", 16, 16),
    "noncausal-w6-m3": ([58, 27, 5], [2, 0, 1], [7, 4, 0], 2, False, 6, 3, "pos", 16, 16),
}


def _kwargs(case, group: int, causal: bool, w: int, m: int, convention: str) -> dict:
    return {
        "alpha": 0.3,
        "scaling_seqlen": 50,
        "causal": causal,
        "num_contextual": case.num_contextual,
        "num_targets": case.num_targets,
        "target_group_size": group,
        "rab": case.rab,
        "mask_convention": convention,
        "max_attn_len": w,
        "min_full_attn_seq_len": m,
    }


@pytest.mark.parametrize("convention", ["hstu", "peer"])
@pytest.mark.parametrize("name", list(CASES))
def test_window_matches_the_dense_reference(
    name: str, convention: str, triton_backend: ModuleType, device: str
) -> None:
    lengths, ctx, tgt, group, causal, w, m, rab, bm, bn = CASES[name]
    case = random_case(
        lengths, num_heads=2, head_dim=16, num_contextual=ctx, num_targets=tgt, rab=rab,
        max_positions=72, device=device, seed=11,
    )
    kw = _kwargs(case, group, causal, w, m, convention)
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    got = triton_backend.triton_hstu_attention(*args, block_m=bm, block_n=bn, **kw)
    want = naive_attention(
        case, alpha=kw["alpha"], scaling_seqlen=kw["scaling_seqlen"], causal=causal,
        target_group_size=group, mask_convention=convention, max_attn_len=w,
        min_full_attn_seq_len=m,
    )
    tol = {"rtol": 1e-4, "atol": 1e-5} if device == "cpu" else {"rtol": 2e-3, "atol": 2e-4}
    torch.testing.assert_close(got.double(), want.to(got.device), **tol)
    names = ["q", "k", "v", "pos_weights", "ts_weights"]
    for n, a, b in zip(names, grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(a, b.to(a), **tol, msg=lambda msg, n=n: f"grad {n}: {msg}")


def test_a_window_covering_the_sample_is_bitwise_full_attention(
    triton_backend: ModuleType, device: str
) -> None:
    """W >= every length: the window code runs but keeps every pair and visits the same
    tiles in the same order as the kernel without it (bitwise in the interpreter; two
    compiled kernels may schedule their float sums differently)."""
    case = random_case([40, 17], num_contextual=[3, 0], num_targets=[5, 2], rab="pos",
                       max_positions=40, device=device, seed=3)
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    tol = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-6}
    for convention in ("hstu", "peer"):
        kw = _kwargs(case, 2, True, 0, 0, convention)
        full = triton_backend.triton_hstu_attention(*args, block_m=32, block_n=16, **kw)
        kw["max_attn_len"] = 40
        windowed = triton_backend.triton_hstu_attention(*args, block_m=32, block_n=16, **kw)
        torch.testing.assert_close(windowed, full, **tol)
        for a, b in zip(grads(windowed, case.leaves()), grads(full, case.leaves())):
            torch.testing.assert_close(a, b, **tol)


def test_bad_window_settings_are_refused_in_one_line(triton_backend: ModuleType) -> None:
    case = random_case([5])
    args = (case.q, case.k, case.v, case.offsets, 5)
    for w, m, match in ((-1, 0, "must be >= 0"), (0, 4, "needs max_attn_len > 0")):
        with pytest.raises(ValueError, match=match) as err:
            triton_backend.triton_hstu_attention(
                *args, alpha=1.0, scaling_seqlen=5, max_attn_len=w, min_full_attn_seq_len=m
            )
        assert "\n" not in str(err.value)


# ---- which tiles the kernels visit ----------------------------------------------------------

BLOCK = 16


def _record_tiles(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> dict[str, list]:
    """Wrap the two tile functions: each call appends (query block, key block)."""
    seen: dict[str, list] = {"fwd": [], "dq": [], "dkdv": []}
    rows, dkdv = module._rows_tile, module._dkdv_tile

    def rows_tile(acc, q, do, n0, offs_m, *rest):  # rest[-1]: DQ
        seen["dq" if rest[-1] else "fwd"].append((int(offs_m.handle.data[0]) // BLOCK, n0 // BLOCK))
        return rows(acc, q, do, n0, offs_m, *rest)

    def dkdv_tile(dk, dv, k, v, m0, j, *rest):
        seen["dkdv"].append((m0 // BLOCK, int(j.handle.data.min()) // BLOCK))
        return dkdv(dk, dv, k, v, m0, j, *rest)

    monkeypatch.setattr(module, "_rows_tile", rows_tile)
    monkeypatch.setattr(module, "_dkdv_tile", dkdv_tile)
    return seen


def _needed_tiles(length, ctx, tgt, group, causal, convention, w, m) -> set[tuple[int, int]]:
    mask = dense_mask(
        torch.tensor([length]),
        None if ctx is None else torch.tensor([ctx]),
        None if tgt is None else torch.tensor([tgt]),
        group, causal, length, convention, w, m,
    )[0]
    blocks = -(-length // BLOCK)
    return {
        (a, b)
        for a in range(blocks)
        for b in range(blocks)
        if mask[a * BLOCK:(a + 1) * BLOCK, b * BLOCK:(b + 1) * BLOCK].any()
    }


# (length, contextual, candidates, group, causal, convention, W, M); one sample, one head
TILE_CASES = {
    "plain-w3": (112, None, None, 1, True, "hstu", 3, 0),
    "plain-w20": (112, None, None, 1, True, "hstu", 20, 0),
    "ctx-targets-hstu": (112, 5, 7, 3, True, "hstu", 9, 0),
    "ctx-targets-peer": (112, 5, 7, 3, True, "peer", 9, 0),
    "min-full-peer": (112, 5, 7, 3, True, "peer", 4, 20),
    "min-full-hstu": (112, 20, 7, 3, True, "hstu", 4, 20),
    "noncausal-hstu": (112, 5, 7, 2, False, "hstu", 9, 0),
}


@pytest.mark.parametrize("name", list(TILE_CASES))
def test_window_visits_exactly_the_tiles_with_allowed_pairs(
    name: str, triton_backend: ModuleType, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if device != "cpu":
        pytest.skip("the tiles are recorded through the interpreter")
    length, ctx, tgt, group, causal, convention, w, m = TILE_CASES[name]
    case = random_case(
        [length], num_heads=1, num_contextual=None if ctx is None else [ctx],
        num_targets=None if tgt is None else [tgt], seed=5,
    )
    seen = _record_tiles(monkeypatch, triton_backend)
    kw = _kwargs(case, group, causal, w, m, convention)
    out = triton_backend.triton_hstu_attention(
        case.q, case.k, case.v, case.offsets, length, block_m=BLOCK, block_n=BLOCK, **kw
    )
    out.sum().backward()
    needed = _needed_tiles(length, ctx, tgt, group, causal, convention, w, m)
    full = _needed_tiles(length, ctx, tgt, group, causal, convention, 0, 0)
    assert len(needed) < len(full)  # the window removes tiles in every case
    for kernel, tiles in seen.items():
        assert len(tiles) == len(set(tiles)), f"{kernel}: a tile visited twice"
        assert set(tiles) == needed, (
            f"{kernel}: visits {sorted(set(tiles) - needed)} without an allowed pair, "
            f"misses {sorted(needed - set(tiles))}"
        )


def test_window_tile_count_grows_linearly_with_the_length(
    triton_backend: ModuleType, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Causal W = 16 with 16-wide tiles: each query block needs its own key block and the one
    before (2 per block), so doubling the length doubles the tiles; full attention
    quadruples them."""
    if device != "cpu":
        pytest.skip("the tiles are recorded through the interpreter")
    counts = {}
    for length in (64, 128):
        for w in (0, 16):
            case = random_case([length], num_heads=1, head_dim=16, seed=1)
            seen = _record_tiles(monkeypatch, triton_backend)
            triton_backend.triton_hstu_attention(
                case.q, case.k, case.v, case.offsets, length, alpha=1.0, scaling_seqlen=length,
                max_attn_len=w, block_m=BLOCK, block_n=BLOCK,
            )
            counts[length, w] = len(seen["fwd"])
    blocks = {64: 4, 128: 8}
    for length, b in blocks.items():
        assert counts[length, 0] == b * (b + 1) // 2
        assert counts[length, 16] == 2 * b - 1
