"""Adapter to FBGEMM's HSTU attention kernels (package ``fbgemm-gpu-hstu``).

Legend: T total tokens, B samples, H heads, d head dim, N ``max_seqlen``, C the largest
number of contextual tokens in the batch.

Facts about the external entry ``hstu_attn_varlen_func`` this adapter relies on (from its
documentation and reference test, version of 2025):
- it computes SiLU(alpha * (Q K^T + rab)) / max_seqlen_q, masked, times V: ``alpha`` scales the
  bias too and the divisor is the batch's max length. We pass ``rab / alpha`` and rescale the
  output by ``max_seqlen / scaling_seqlen`` (the output is linear in that factor).
- sequence offsets are int32; ``rab`` is dense [B, heads_rab, N, N]; ``has_drab`` asks for its
  gradient; targets and contexts need the causal window (-1, 0).
- its contextual rows attend the whole non-candidate history, while ours attend only the
  contextual block (hstu.ops.masks). We therefore call it without ``num_contexts`` (plain
  causal) and recompute the C contextual rows of each sample here, densely; C is small.
- it runs on sm80/sm90 with fp16/bf16 and head dims 32, 64, 128, 256.

The package installs a top-level module named ``hstu``, the same name as this project, so
``import hstu`` would return us. We look for ``fbgemm_gpu.experimental.hstu`` first, then for
another ``hstu`` on sys.path that is not this project, loaded under a private module name.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hstu.ops.masks import lengths_from_offsets
from hstu.ops.rab import RelativeAttentionBias, padded_bias

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_MAJOR_CAPABILITIES = (8, 9)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_PRIVATE_NAME = "_fbgemm_gpu_hstu_external"
_ENTRY = "hstu_attn_varlen_func"

_loaded: tuple[Callable[..., Tensor] | None, str] | None = None


def _entry_of(module: object) -> Callable[..., Tensor] | None:
    fn = getattr(module, _ENTRY, None)
    if callable(fn):
        return fn
    name = getattr(module, "__name__", "")
    try:
        sub = importlib.import_module(f"{name}.cuda_hstu_attention")
    except Exception:  # noqa: BLE001 - a binary extension may fail with any error type
        return None
    fn = getattr(sub, _ENTRY, None)
    return fn if callable(fn) else None


def _external_top_level_hstu() -> Callable[..., Tensor] | None:
    """Find a module ``hstu`` on sys.path that is not this project and load it privately."""
    own_dir = Path(__file__).resolve().parent.parent
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec("hstu", [entry or "."])
        if spec is None or spec.origin is None or spec.submodule_search_locations is None:
            continue
        if Path(spec.origin).resolve().parent == own_dir:
            continue
        if _PRIVATE_NAME in sys.modules:
            return _entry_of(sys.modules[_PRIVATE_NAME])
        private = importlib.util.spec_from_file_location(
            _PRIVATE_NAME,
            spec.origin,
            submodule_search_locations=list(spec.submodule_search_locations),
        )
        if private is None or private.loader is None:
            continue
        module = importlib.util.module_from_spec(private)
        sys.modules[_PRIVATE_NAME] = module
        try:
            private.loader.exec_module(module)
        except Exception:
            del sys.modules[_PRIVATE_NAME]
            raise
        fn = _entry_of(module)
        if fn is not None:
            return fn
    return None


def load_entry() -> tuple[Callable[..., Tensor] | None, str]:
    """(hstu_attn_varlen_func, "") when importable, else (None, why not). Cached."""
    global _loaded
    if _loaded is not None:
        return _loaded
    problems: list[str] = []
    try:
        fn = _entry_of(importlib.import_module("fbgemm_gpu.experimental.hstu"))
        if fn is not None:
            _loaded = (fn, "")
            return _loaded
        problems.append(f"fbgemm_gpu.experimental.hstu has no {_ENTRY}")
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError of a CUDA lib, ...
        problems.append(f"fbgemm_gpu.experimental.hstu not importable ({type(exc).__name__})")
    try:
        fn = _external_top_level_hstu()
        if fn is not None:
            _loaded = (fn, "")
            return _loaded
        problems.append("no external 'hstu' module (package fbgemm-gpu-hstu) on sys.path")
    except Exception as exc:  # noqa: BLE001 - reported as the fallback reason
        problems.append(f"external 'hstu' module failed to load ({type(exc).__name__}: {exc})")
    _loaded = (None, "; ".join(problems))
    return _loaded


def unavailable_reason(
    head_dim: int,
    value_head_dim: int,
    device: torch.device,
    dtype: torch.dtype | None,
    causal: bool,
    has_targets: bool,
) -> str | None:
    """None when the cutlass kernels can run this call, else a short reason."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_MAJOR_CAPABILITIES:
        return f"GPU sm{major}{minor} is not sm80/sm90"
    if head_dim not in SUPPORTED_HEAD_DIMS or value_head_dim != head_dim:
        return f"head dim {head_dim}/{value_head_dim} not in {SUPPORTED_HEAD_DIMS}"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not fp16/bf16"
    if has_targets and not causal:
        return "candidates need the causal mask in FBGEMM's kernels"
    fn, why = load_entry()
    if fn is None:
        return f"fbgemm-gpu-hstu not importable: {why}"
    return None


def _contextual_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    num_contextual: Tensor,
    bias: Tensor | None,
    alpha: float,
    scaling_seqlen: int,
) -> tuple[Tensor, Tensor] | None:
    """Our contextual rows: row i < C[b] attends exactly the keys j < C[b].

    Returns:
        (token ids [R], outputs [R, H, d]) for the R contextual tokens, or None when R = 0.
    """
    width = int(num_contextual.max().item()) if num_contextual.numel() else 0
    if width == 0:
        return None
    slot = torch.arange(width, device=q.device)
    valid = slot.view(1, -1) < num_contextual.view(-1, 1)
    index = torch.where(valid, offsets[:-1].view(-1, 1) + slot.view(1, -1), 0)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = (x[index].to(compute_dtype) for x in (q, k, v))
    scores = alpha * torch.einsum("bihd,bjhd->bhij", qc, kc)
    if bias is not None:
        scores = scores + bias[:, :, :width, :width].to(compute_dtype)
    keep = valid.view(-1, 1, width, 1) & valid.view(-1, 1, 1, width)
    weights = torch.where(keep, F.silu(scores), 0.0) / scaling_seqlen
    out = torch.einsum("bhij,bjhd->bihd", weights, vc)[valid]
    return index[valid], out


def cutlass_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    max_seqlen: int,
    *,
    alpha: float,
    scaling_seqlen: int,
    causal: bool = True,
    num_contextual: Tensor | None = None,
    num_targets: Tensor | None = None,
    target_group_size: int = 1,
    rab: RelativeAttentionBias | None = None,
) -> Tensor:
    """HSTU attention through FBGEMM's kernels; same contract as ``hstu_attention``.

    Only call where ``unavailable_reason`` returned None. With ``rab`` a dense
    [B, 1, N, N] bias is materialised (that is what the external kernel consumes).
    """
    fn, why = load_entry()
    if fn is None:
        raise RuntimeError(f"cutlass backend unavailable: {why}")
    cu_seqlens = offsets.to(torch.int32)
    num_samples = offsets.numel() - 1
    bias = None
    if rab is not None:
        slot = torch.arange(max_seqlen, device=q.device)
        lengths = lengths_from_offsets(offsets)
        index = torch.where(
            slot.view(1, -1) < lengths.view(-1, 1), offsets[:-1].view(-1, 1) + slot.view(1, -1), 0
        )
        bias = padded_bias(rab, index, lengths).expand(num_samples, -1, -1).unsqueeze(1)
    out = fn(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        num_contexts=None,
        num_targets=None if num_targets is None else num_targets.to(torch.int32),
        target_group_size=target_group_size,
        window_size=(-1, 0) if causal else (-1, -1),
        alpha=alpha,
        rab=None if bias is None else (bias / alpha).to(q.dtype).contiguous(),
        has_drab=bias is not None and bias.requires_grad,
    )
    out = out * (max_seqlen / scaling_seqlen)
    if num_contextual is not None and causal:  # non-causal: contextual rows see all history
        fixed = _contextual_rows(q, k, v, offsets, num_contextual, bias, alpha, scaling_seqlen)
        if fixed is not None:
            rows, values = fixed
            out = out.index_copy(0, rows, values.to(out.dtype))
    return out
