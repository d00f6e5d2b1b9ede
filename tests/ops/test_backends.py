"""Backend resolution: honest one-line fallbacks, strict errors."""

import pytest
import torch

from hstu.ops import BackendUnavailableError, backends, hstu_attention, resolve_backend

from .reference import random_case

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU-host fallbacks")


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_reported", set())


@no_cuda
def test_cutlass_on_cpu_falls_back_with_one_line(monkeypatch, capsys) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("cutlass", 64, torch.device("cpu")) == "pytorch"
    assert resolve_backend("cutlass", 64, torch.device("cpu")) == "pytorch"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "hstu_attention: backend 'cutlass' cannot run here (no CUDA device); running 'pytorch' instead"
    ]


@no_cuda
def test_cutlass_falls_back_to_triton_when_triton_can_run(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("cutlass", 64, torch.device("cpu")) == "triton"
    assert "running 'triton' instead" in capsys.readouterr().err


@no_cuda
def test_triton_on_cpu_without_interpreter_falls_back(monkeypatch, capsys) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = random_case([5, 3])
    out = hstu_attention(
        case.q, case.k, case.v, case.offsets, 5, alpha=1.0, scaling_seqlen=5, backend="triton"
    )
    want = hstu_attention(case.q, case.k, case.v, case.offsets, 5, alpha=1.0, scaling_seqlen=5)
    torch.testing.assert_close(out, want)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRITON_INTERPRET is not set" in err[0] and "'pytorch'" in err[0]


@no_cuda
def test_strict_raises_instead_of_falling_back(capsys) -> None:
    case = random_case([4])
    with pytest.raises(BackendUnavailableError, match="cutlass.*no CUDA device"):
        hstu_attention(
            case.q,
            case.k,
            case.v,
            case.offsets,
            4,
            alpha=1.0,
            scaling_seqlen=4,
            backend="cutlass",
            strict=True,
        )
    assert capsys.readouterr().err == ""


def test_pytorch_never_falls_back_and_unknown_names_fail(capsys) -> None:
    assert resolve_backend("pytorch", 7, torch.device("cpu"), strict=True) == "pytorch"
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", 64, torch.device("cpu"))


def test_triton_rejects_different_value_head_dim(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailableError, match="v head dim"):
        resolve_backend("triton", 32, torch.device("cpu"), strict=True, value_head_dim=64)


def test_cutlass_module_lookup_does_not_return_this_project() -> None:
    from hstu.ops import cutlass_attention

    fn = cutlass_attention._external_top_level_hstu()
    # None here (no fbgemm-gpu-hstu); where it is installed, its function, never ours
    assert fn is None or not fn.__module__.startswith("hstu.")
    import hstu

    assert hstu.__file__.endswith("hstu/__init__.py") and hasattr(hstu, "__version__")
