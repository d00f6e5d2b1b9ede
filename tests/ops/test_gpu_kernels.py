"""Real (compiled) triton and FBGEMM cutlass kernels vs the pytorch reference, on a GPU."""

import pytest
import torch

from hstu.ops import hstu_attention
from hstu.ops.cutlass_attention import unavailable_reason

from .reference import grads, random_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LENGTHS = [300, 17, 129, 256, 64, 1]
CTX = [6, 0, 6, 3, 0, 0]
TGT = [40, 5, 64, 10, 0, 1]


def _compare(backend: str, dtype: torch.dtype, rab: str, group: int, head_dim: int = 64) -> None:
    case = random_case(
        LENGTHS,
        num_heads=4,
        head_dim=head_dim,
        num_contextual=CTX,
        num_targets=TGT,
        rab=rab,
        max_positions=320,
        dtype=dtype,
        device="cuda",
    )
    kw = {
        "alpha": head_dim**-0.5,
        "scaling_seqlen": 320,
        "num_contextual": case.num_contextual,
        "num_targets": case.num_targets,
        "target_group_size": group,
        "rab": case.rab,
    }
    args = (case.q, case.k, case.v, case.offsets, 320)
    got = hstu_attention(*args, backend=backend, strict=True, **kw)
    want = hstu_attention(*args, backend="pytorch", **kw)  # float32 math inside
    scale = want.abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)
    for a, b in zip(grads(got, case.leaves()), grads(want, case.leaves())):
        torch.testing.assert_close(
            a.float(), b.float(), rtol=tol, atol=tol * max(b.abs().max().item(), 1e-6)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rab, group", [("none", 1), ("pos+ts", 4)])
def test_compiled_triton_matches_pytorch(dtype: torch.dtype, rab: str, group: int) -> None:
    _compare("triton", dtype, rab, group)


@pytest.mark.parametrize("rab, group", [("none", 1), ("none", 4), ("pos+ts", 2)])
def test_cutlass_matches_pytorch(rab: str, group: int) -> None:
    reason = unavailable_reason(64, 64, torch.device("cuda"), torch.bfloat16, True, True)
    if reason is not None:
        pytest.skip(f"cutlass backend unavailable: {reason}")
    _compare("cutlass", torch.bfloat16, rab, group)


def test_cuda_max_seqlen_check_needs_the_debug_flag(monkeypatch) -> None:
    case = random_case([9, 4], device="cuda")
    args = (case.q, case.k, case.v, case.offsets, 8)
    monkeypatch.delenv("HSTU_CHECK_MAX_SEQLEN", raising=False)
    # unchecked (no host sync): runs; the rows past the grid are checked in the next test
    hstu_attention(*args, alpha=1.0, scaling_seqlen=9, backend="triton", strict=True)
    monkeypatch.setenv("HSTU_CHECK_MAX_SEQLEN", "1")
    with pytest.raises(ValueError, match="max_seqlen=8 is smaller than the longest sample"):
        hstu_attention(*args, alpha=1.0, scaling_seqlen=9, backend="triton", strict=True)


def test_compiled_triton_rows_past_max_seqlen_are_nan() -> None:
    from hstu.ops.backends import triton_module

    case = random_case([80, 7], device="cuda", seed=4)
    got = triton_module().triton_hstu_attention(
        case.q, case.k, case.v, case.offsets, 10, alpha=0.5, scaling_seqlen=80,
        block_m=16, block_n=16,
    )
    assert torch.isnan(got[16:80]).all() and torch.isfinite(got[:16]).all()


@pytest.mark.parametrize("backend", ["triton", "cutlass"])
def test_attention_step_has_no_host_sync(backend: str) -> None:
    dtype = torch.bfloat16
    if backend == "cutlass":
        reason = unavailable_reason(64, 64, torch.device("cuda"), dtype, True, True)
        if reason is not None:
            pytest.skip(f"cutlass backend unavailable: {reason}")
    case = random_case(
        LENGTHS, num_heads=4, head_dim=64, num_contextual=CTX, num_targets=TGT, rab="pos+ts",
        max_positions=320, dtype=dtype, device="cuda",
    )
    kw = {
        "alpha": 0.125, "scaling_seqlen": 320, "num_contextual": case.num_contextual,
        "num_targets": case.num_targets, "target_group_size": 2, "rab": case.rab,
        "backend": backend, "strict": True,
    }
    args = (case.q, case.k, case.v, case.offsets, 320)
    hstu_attention(*args, **kw).float().square().sum().backward()  # compile + tune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hstu_attention(*args, **kw).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
