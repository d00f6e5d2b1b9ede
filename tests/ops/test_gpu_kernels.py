"""Real (compiled) triton and FBGEMM cutlass kernels vs the pytorch reference, on a GPU."""

import dataclasses

import pytest
import torch

from hstu.ops import hstu_attention
from hstu.ops.cutlass_attention import unavailable_reason

from .reference import JaggedCase, grads, random_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LENGTHS = [300, 17, 129, 256, 64, 1]
CTX = [6, 0, 6, 3, 0, 0]
TGT = [40, 5, 64, 10, 0, 1]


def _float32_twin(case: JaggedCase) -> JaggedCase:
    """The same case in float32: the low-precision values, exactly, as float32 leaves."""

    def up(x):
        return None if x is None else x.detach().float().requires_grad_()

    rab = case.rab
    if rab is not None:
        rab = dataclasses.replace(
            rab, pos_weights=up(rab.pos_weights), ts_weights=up(rab.ts_weights)
        )
    return dataclasses.replace(case, q=up(case.q), k=up(case.k), v=up(case.v), rab=rab)


def _relative_errors(got: list, want: list) -> list[float]:
    return [
        ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
        for a, b in zip(got, want)
    ]


def _compare(backend: str, dtype: torch.dtype, rab: str, group: int, head_dim: int = 64) -> None:
    """float32: the kernel within 1e-4 (relative to each tensor's largest value) of the
    pytorch backend. bfloat16: the kernel and the bfloat16 pytorch backend both against the
    pytorch backend in float32 on the same values; the kernel may round at most twice as much
    as the bfloat16 reference does (or 1e-3), as hstu.gpu_check's kernels_vs_reference."""
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

    def run(case: JaggedCase, backend: str) -> list:
        kw = {
            "alpha": head_dim**-0.5,
            "scaling_seqlen": 320,
            "num_contextual": case.num_contextual,
            "num_targets": case.num_targets,
            "target_group_size": group,
            "rab": case.rab,
        }
        strict = {} if backend == "pytorch" else {"strict": True}
        out = hstu_attention(case.q, case.k, case.v, case.offsets, 320, backend=backend,
                             **strict, **kw)
        return [out, *grads(out, case.leaves())]

    got = run(case, backend)
    if dtype == torch.float32:
        errors = _relative_errors(got, run(case, "pytorch"))
        assert max(errors) <= 1e-4, errors
        return
    exact = run(_float32_twin(case), "pytorch")
    errors = _relative_errors(got, exact)
    baseline = _relative_errors(run(case, "pytorch"), exact)
    limits = [max(2.0 * b, 1e-3) for b in baseline]
    assert all(e <= lim for e, lim in zip(errors, limits)), (errors, baseline)


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
