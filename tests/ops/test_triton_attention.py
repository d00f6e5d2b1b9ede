"""Triton kernel vs the pytorch reference: values and gradients (interpreted on CPU)."""

from types import ModuleType

import pytest
import torch

from hstu.ops import hstu_attention

from .reference import grads, random_case
from .test_pytorch_attention import check_no_leakage

# (lengths, contextual, candidates, group size, causal, rab); lengths up to 40 with 16-wide
# tiles exercise partial tiles, several key blocks and skipped candidate blocks.
CASES = {
    "causal-plain": ([23, 40, 7], None, None, 1, True, "none"),
    "ctx-targets-g1": ([23, 40, 7], [3, 2, 0], [5, 9, 2], 1, True, "none"),
    "ctx-targets-g3-pos": ([33, 40, 1], [4, 17, 0], [7, 20, 1], 3, True, "pos"),
    "ctx-targets-g2-rab": ([23, 40, 7], [3, 2, 0], [5, 9, 2], 2, True, "pos+ts"),
    "noncausal-targets-rab": ([19, 36, 5], [2, 0, 1], [6, 8, 0], 4, False, "pos+ts"),
    # retrieval's query times: the last token's next time (NetworkArgs.rab_query_time)
    "causal-rab-query-time": ([23, 40, 7, 1], None, None, 1, True, "pos+ts+qt"),
    # an empty sample, a sample made only of candidates, a single token
    "edge-lengths": ([0, 20, 1, 9], [0, 0, 1, 3], [0, 20, 0, 2], 3, True, "pos"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_pytorch(name: str, triton_backend: ModuleType, device: str) -> None:
    lengths, ctx, tgt, group, causal, rab = CASES[name]
    case = random_case(
        lengths,
        num_heads=2,
        head_dim=16,
        num_contextual=ctx,
        num_targets=tgt,
        rab=rab,
        max_positions=44,
        device=device,
        seed=7,
    )
    kw = {
        "alpha": 0.25,
        "scaling_seqlen": 40,
        "causal": causal,
        "num_contextual": case.num_contextual,
        "num_targets": case.num_targets,
        "target_group_size": group,
        "rab": case.rab,
        "strict": True,
    }
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    got = hstu_attention(*args, backend="triton", **kw)
    want = hstu_attention(*args, backend="pytorch", **kw)
    tol = {"rtol": 1e-4, "atol": 1e-5} if device == "cpu" else {"rtol": 2e-3, "atol": 2e-4}
    torch.testing.assert_close(got, want, **tol)
    names = ["q", "k", "v", "pos_weights", "ts_weights"]
    for n, a, b in zip(names, grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=n: f"grad {n}: {m}")


def test_triton_strided_inputs_and_padded_head_dim(triton_backend: ModuleType, device: str) -> None:
    """q/k/v as views into one fused projection (token stride 3*H*d), d = 24 (padded to 32)."""
    lengths, heads, dim = [18, 9], 2, 24
    total = sum(lengths)
    fused = torch.randn(total, 3, heads, dim, device=device, requires_grad=True)
    q, k, v = fused.unbind(1)
    offsets = torch.tensor([0, 18, 27], device=device)
    kw = {
        "alpha": 0.2,
        "scaling_seqlen": 18,
        "num_targets": torch.tensor([3, 2], device=device),
        "target_group_size": 2,
    }
    got = hstu_attention(q, k, v, offsets, 18, backend="triton", strict=True, **kw)
    want = hstu_attention(q, k, v, offsets, 18, backend="pytorch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    (g_got,) = grads(got, [fused])
    (g_want,) = grads(want, [fused])
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_triton_mask_blocks_leakage(triton_backend: ModuleType, device: str) -> None:
    check_no_leakage("triton", device)


def test_triton_block_sizes_do_not_change_the_result(
    triton_backend: ModuleType, device: str
) -> None:
    case = random_case([37, 20], num_contextual=[5, 0], num_targets=[9, 4], device=device, seed=2)
    kw = {
        "alpha": 0.3,
        "scaling_seqlen": 37,
        "num_contextual": case.num_contextual,
        "num_targets": case.num_targets,
        "target_group_size": 3,
    }
    args = (case.q, case.k, case.v, case.offsets, case.max_seqlen)
    small = triton_backend.triton_hstu_attention(*args, block_m=16, block_n=16, **kw)
    wide = triton_backend.triton_hstu_attention(*args, block_m=32, block_n=16, **kw)
    torch.testing.assert_close(small, wide, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["pytorch", "triton"])
def test_max_seqlen_below_the_longest_sample_is_refused(
    backend: str, triton_backend: ModuleType, device: str
) -> None:
    if device != "cpu":
        pytest.skip("CUDA offsets are checked only with HSTU_CHECK_MAX_SEQLEN=1 (gpu test)")
    case = random_case([9, 4], device=device)
    with pytest.raises(ValueError, match=r"max_seqlen=8 is smaller than the longest sample \(9"):
        hstu_attention(
            case.q, case.k, case.v, case.offsets, 8, alpha=1.0, scaling_seqlen=9,
            backend=backend, strict=True,
        )


def test_triton_rows_past_max_seqlen_come_out_nan(triton_backend: ModuleType, device: str) -> None:
    """Unchecked (CUDA without the debug flag), a too-small max_seqlen must not give zeros."""
    case = random_case([40, 7], device=device, seed=4)
    kw = {"alpha": 0.5, "scaling_seqlen": 40}
    args = (case.q, case.k, case.v, case.offsets)
    got = triton_backend.triton_hstu_attention(*args, 10, block_m=16, block_n=16, **kw)
    want = hstu_attention(*args, 40, backend="pytorch", **kw)
    # the grid covers rows [0, 16) of each sample; the rest of sample 0 is NaN
    torch.testing.assert_close(got[:16], want[:16], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[40:], want[40:], rtol=1e-4, atol=1e-5)
    assert torch.isnan(got[16:40]).all()


def test_interpreter_picks_one_tile_config_without_timing(
    triton_backend: ModuleType, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if device != "cpu":
        pytest.skip("the interpreter runs on CPU hosts only")

    def no_timing(launch):
        raise AssertionError("the interpreter must not be timed")

    monkeypatch.setattr(triton_backend, "_cuda_timer", no_timing)
    monkeypatch.setattr(triton_backend, "_tuned", {})
    case = random_case([20, 5], device=device)
    out = triton_backend.triton_hstu_attention(
        case.q, case.k, case.v, case.offsets, 20, alpha=1.0, scaling_seqlen=20
    )
    out.sum().backward()
    keys = sorted(triton_backend._tuned, key=str)
    assert [k[:4] for k in keys] == [("bwd", 16, torch.float32, 32), ("fwd", 16, torch.float32, 32)]
    tiles = {(cfg["BLOCK_M"], cfg["BLOCK_N"]) for cfg in triton_backend._tuned.values()}
    assert tiles == {(16, 16)}


def test_tile_choice_is_the_fastest_and_cached(
    triton_backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton_backend, "_tuned", {})
    candidates = [{"BLOCK_M": m} for m in (64, 128, 32, 16)]
    cost = {64: 3.0, 128: 1.0, 32: 2.0}
    calls: list[int] = []

    def measure(cfg):
        calls.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] == 16:
            raise triton_backend.OutOfResources(1, 0, "shared memory")
        return cost[cfg["BLOCK_M"]]

    key = ("fwd", 64, torch.bfloat16, 1024, ())
    assert triton_backend.choose_tiles(key, candidates, measure) == {"BLOCK_M": 128}
    assert triton_backend.choose_tiles(key, candidates, measure) == {"BLOCK_M": 128}
    assert calls == [64, 128, 32, 16]  # timed once, then cached
    other = ("fwd", 64, torch.bfloat16, 2048, ())
    assert triton_backend.choose_tiles(other, candidates, None) == {"BLOCK_M": 64}
    assert [triton_backend.length_bucket(n) for n in (1, 16, 17, 1024, 1025)] == [
        16, 16, 32, 1024, 2048,
    ]
