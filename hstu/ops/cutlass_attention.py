"""Adapter to FBGEMM's HSTU attention kernels (``hstu_attn_varlen_func``).

Legend: T total tokens, B samples, H heads, d head dim, N ``max_seqlen``, C[b] the
contextual tokens of sample b.

The entry is called by keyword only, with the names its installed signature has (checked
with ``inspect.signature`` at first use, see ``bind_entry``). Verified against:
- PyPI ``fbgemm-gpu-hstu-nightly`` 2026.3.24 (the only HSTU wheel on PyPI; cp314 builds),
  module ``fbgemm_gpu.experimental.hstu.cuda_hstu_attention``:
  ``hstu_attn_varlen_func(q, k, v, seq_offsets_q, seq_offsets_k, max_seqlen_q, max_seqlen_k,
  num_contexts, num_targets, target_group_size=1, window_size=(-1, -1), alpha=1.0, rab=None,
  has_drab=False, is_delta_q=False, descale_q=None, descale_k=None, descale_v=None)``;
- the source build of FBGEMM's ``fbgemm_gpu/experimental/hstu`` (its setup.py makes the
  package ``fbgemm_gpu_hstu`` with a top-level module ``hstu``) at commit 0c08af9f: the same
  parameters with ``cu_seqlens_q`` / ``cu_seqlens_k`` for the offsets, then paged-KV, ``func``
  and ``quant_mode`` keywords with defaults.

Semantics relied on (its reference test ``_hstu_attention_maybe_from_cache`` and op checks):
- it computes SiLU(alpha * (Q K^T + rab)) / max_seqlen_q, masked, times V: ``alpha`` scales the
  bias too and the divisor is ``max_seqlen_q``. We pass ``rab / alpha`` and rescale the output
  by ``max_seqlen / scaling_seqlen`` (the output is linear in that factor).
- offsets, ``num_contexts`` and ``num_targets`` are int32; ``rab`` is dense
  [B, heads_rab (1 or H), N, N]; contexts and targets need the causal window (-1, 0).
- its contextual rows attend the whole non-candidate history: our ``mask_convention="peer"``,
  passed as ``num_contexts``. Under "hstu" ours attend only the contextual block
  (hstu.ops.masks): we call it without ``num_contexts`` (plain causal, the same for every
  other row) and compute the contextual rows with a second call over the contextual
  prefixes only, without a mask (window (-1, -1)): exactly "i < C sees j < C".
- ``window_size=(left, right)`` (FBGEMM source at 71d6f8b2, 2026-08-21: the parameter set-up
  of ``hstu_ops_gpu.cpp``, the masks of ``hstu_fwd.h`` / ``hstu_bwd.h`` and of the sm90
  mainloops, the reference mask of ``test/hstu_test.py``): a value < 0 or > ``max_seqlen_k``
  means ``max_seqlen_k``; (max, 0) is the causal mask; any other window is "local": key j
  of row i is kept iff i - left <= j <= i + right, and the op refuses ``num_contexts`` /
  ``num_targets`` with it. So it equals our semi-local rule (hstu.ops.masks) exactly when
  there are no contextual tokens, no candidates and ``min_full_attn_seq_len`` = 0: pos(t) = t
  and the pair is kept iff |i - j| <= W, i.e. window (W, 0) causal and (W, W) without the
  causal mask. Every other window call is refused in one line (``fbgemm_window_size``).
- sm80/sm90, head dims 32, 64, 128, 256; bf16 (FBGEMM's setup.py disables fp16 unless
  HSTU_DISABLE_FP16=FALSE and its tests run bf16 only, so fp16 is not offered here).

A source build installs a top-level module named ``hstu``, the same name as this project, so
``import hstu`` would return us. We look for ``fbgemm_gpu.experimental.hstu`` first, then for
another ``hstu`` on sys.path that is not this project, loaded under a private module name.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hstu.ops.jagged import lengths_to_offsets
from hstu.ops.masks import AttentionOptions
from hstu.ops.rab import padded_bias

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_MAJOR_CAPABILITIES = (8, 9)
SUPPORTED_DTYPES = (torch.bfloat16,)
VERIFIED_AGAINST = "fbgemm-gpu-hstu-nightly 2026.3.24 / FBGEMM source at 0c08af9f"
_PRIVATE_NAME = "_fbgemm_gpu_hstu_external"
_ENTRY = "hstu_attn_varlen_func"

# What we pass, by role -> the parameter names the verified versions give it (first match).
ENTRY_PARAMETERS: dict[str, tuple[str, ...]] = {
    "q": ("q",),
    "k": ("k",),
    "v": ("v",),
    "offsets_q": ("seq_offsets_q", "cu_seqlens_q"),
    "offsets_k": ("seq_offsets_k", "cu_seqlens_k"),
    "max_seqlen_q": ("max_seqlen_q",),
    "max_seqlen_k": ("max_seqlen_k",),
    "num_contexts": ("num_contexts",),
    "num_targets": ("num_targets",),
    "target_group_size": ("target_group_size",),
    "window_size": ("window_size",),
    "alpha": ("alpha",),
    "rab": ("rab",),
    "has_drab": ("has_drab",),
}

# The dense [B, 1, N, N] bias of a call with rab: FBGEMM takes the bias itself, not our
# tables, so it has to be built. Per element it costs about 26 bytes alive at once (int64
# time-bucket index, float32 bias and its / alpha, the bf16 copy we pass, FBGEMM's padded
# copy kept for backward, the bias gradient); 2**27 elements (B = 32 at N = 2048) is about
# 3.5 GiB. Past it the call is refused: the triton backend computes the bias in the kernel.
MAX_DENSE_BIAS_ELEMENTS = 2**27
_DENSE_BIAS_BYTES_PER_ELEMENT = 26

_loaded: tuple[Callable[..., Tensor] | None, str] | None = None
_bindings: dict[int, tuple[Callable[..., Tensor], dict[str, str] | None, str]] = {}


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


def _entry_name(fn: Callable[..., Tensor]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', _ENTRY)}"


def bind_entry(fn: Callable[..., Tensor]) -> tuple[dict[str, str] | None, str]:
    """({role: parameter name}, "") when ``fn``'s signature has every parameter we pass and
    requires none we do not know, else (None, one line naming the parameter). Cached."""
    cached = _bindings.get(id(fn))
    if cached is not None and cached[0] is fn:
        return cached[1], cached[2]
    names: dict[str, str] | None = {}
    why = ""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        names, why = None, f"{_entry_name(fn)} has no inspectable signature ({exc})"
    else:
        keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        for role, accepted in ENTRY_PARAMETERS.items():
            found = [n for n in accepted if n in params and params[n].kind in keyword_kinds]
            if not found:
                names = None
                why = (
                    f"{_entry_name(fn)} has no keyword parameter "
                    f"{' / '.join(repr(n) for n in accepted)} (renamed or removed; the adapter "
                    f"was checked against {VERIFIED_AGAINST})"
                )
                break
            names[role] = found[0]
        if names is not None:
            known = set(names.values())
            unknown = [
                p.name
                for p in params.values()
                if p.kind in keyword_kinds and p.default is p.empty and p.name not in known
            ]
            if unknown:
                names = None
                why = (
                    f"{_entry_name(fn)} requires parameter {unknown[0]!r}, which the adapter "
                    f"does not pass (checked against {VERIFIED_AGAINST})"
                )
    _bindings[id(fn)] = (fn, names, why)
    return names, why


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
        return f"dtype {dtype} is not bf16 (the dtype FBGEMM builds and tests)"
    if has_targets and not causal:
        return "candidates need the causal mask in FBGEMM's kernels"
    fn, why = load_entry()
    if fn is None:
        return f"fbgemm-gpu-hstu not importable: {why}"
    names, why = bind_entry(fn)
    if names is None:
        return why
    return None


def check_dense_bias_size(num_samples: int, max_seqlen: int) -> None:
    """Refuse a call whose dense [B, 1, N, N] bias would pass ``MAX_DENSE_BIAS_ELEMENTS``."""
    elements = num_samples * max_seqlen * max_seqlen
    if elements > MAX_DENSE_BIAS_ELEMENTS:
        gib = elements * _DENSE_BIAS_BYTES_PER_ELEMENT / 2**30
        raise ValueError(
            f"cutlass backend with rab needs a dense [B, 1, N, N] bias: B={num_samples}, "
            f"N={max_seqlen} is {elements:,} elements (~{gib:.1f} GiB with its index and "
            f"copies), over the limit of {MAX_DENSE_BIAS_ELEMENTS:,}; use backend='triton', "
            "which computes the bias inside the kernel"
        )


WINDOW_BACKENDS = "'triton' or 'pytorch'"


def fbgemm_window_size(
    max_attn_len: int,
    min_full_attn_seq_len: int,
    causal: bool,
    has_contextual: bool,
    has_targets: bool,
) -> tuple[int, int]:
    """FBGEMM's ``window_size`` for our mask with the semi-local window (module docstring).

    Raises ValueError (one line naming the option) for a window FBGEMM's kernels cannot
    express: ``min_full_attn_seq_len`` > 0, contextual tokens or candidates with
    ``max_attn_len`` > 0 (given as tensors; their values are not read, which would cost a
    host sync).
    """
    if max_attn_len == 0:
        return (-1, 0) if causal else (-1, -1)
    lacking = [
        name
        for name, present in (
            (f"min_full_attn_seq_len={min_full_attn_seq_len}", min_full_attn_seq_len > 0),
            ("contextual tokens", has_contextual),
            ("candidates", has_targets),
        )
        if present
    ]
    if lacking:
        raise ValueError(
            f"cutlass backend: max_attn_len={max_attn_len} with {' and '.join(lacking)} has no "
            "equivalent in FBGEMM's window_size (a plain sliding window only); use kernel "
            f"backend {WINDOW_BACKENDS}, which take max_attn_len and min_full_attn_seq_len"
        )
    return (max_attn_len, 0) if causal else (max_attn_len, max_attn_len)


def _sample_of_token(offsets: Tensor, num_tokens: int) -> Tensor:
    """int64 [T]: the sample each token belongs to (empty samples are skipped)."""
    token = torch.arange(num_tokens, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets[1:].contiguous(), token, right=True)


def cutlass_hstu_attention(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, max_seqlen: int, **options: Any
) -> Tensor:
    """HSTU attention through FBGEMM's kernels; the arguments of ``hstu.ops.hstu_attention``
    (``options``: the fields of ``AttentionOptions``).

    FBGEMM's own contextual rows are those of ``mask_convention="peer"`` (every non-candidate
    key), passed as its ``num_contexts``; "hstu" rows (the contextual block only) are a
    second call over the contextual prefixes. A window (``max_attn_len`` > 0) is passed as
    FBGEMM's ``window_size`` where that is the same mask, else refused
    (``fbgemm_window_size``).

    Only call where ``unavailable_reason`` returned None. With ``rab`` a dense
    [B, 1, N, N] bias is materialised (that is what the external kernel consumes), refused
    past ``MAX_DENSE_BIAS_ELEMENTS``. No host synchronisation: every size used is ``T``,
    ``B`` or ``max_seqlen``.
    """
    o = AttentionOptions(**options)
    alpha, causal, rab, target_group_size = o.alpha, o.causal, o.rab, o.target_group_size
    num_contextual, num_targets = o.num_contextual, o.num_targets
    window = fbgemm_window_size(
        o.max_attn_len, o.min_full_attn_seq_len, causal, num_contextual is not None,
        num_targets is not None,
    )
    fn, why = load_entry()
    if fn is None:
        raise RuntimeError(f"cutlass backend unavailable: {why}")
    names, why = bind_entry(fn)
    if names is None:
        raise RuntimeError(f"cutlass backend unavailable: {why}")
    num_tokens = q.shape[0]
    num_samples = offsets.numel() - 1
    bias = None
    if rab is not None:
        check_dense_bias_size(num_samples, max_seqlen)
        slot = torch.arange(max_seqlen, device=q.device)
        lengths = offsets[1:] - offsets[:-1]
        index = torch.where(
            slot.view(1, -1) < lengths.view(-1, 1), offsets[:-1].view(-1, 1) + slot.view(1, -1), 0
        )
        bias = padded_bias(rab, index, lengths).expand(num_samples, -1, -1).unsqueeze(1)
        bias = (bias / alpha).to(q.dtype).contiguous()

    def call(
        qx: Tensor, kx: Tensor, vx: Tensor, seq_offsets: Tensor, window: tuple[int, int],
        targets: Tensor | None, contexts: Tensor | None = None,
    ) -> Tensor:
        values = {
            "q": qx.contiguous(),
            "k": kx.contiguous(),
            "v": vx.contiguous(),
            "offsets_q": seq_offsets,
            "offsets_k": seq_offsets,
            "max_seqlen_q": max_seqlen,
            "max_seqlen_k": max_seqlen,
            "num_contexts": contexts,
            "num_targets": targets,
            "target_group_size": target_group_size,
            "window_size": window,
            "alpha": alpha,
            "rab": bias,
            "has_drab": bias is not None and bias.requires_grad,
        }
        return fn(**{names[role]: value for role, value in values.items()})

    targets32 = None if num_targets is None else num_targets.to(torch.int32)
    # without the causal window, contextual rows see every key under both conventions when
    # there are no candidates (with candidates such a call never reaches this backend)
    peer_contexts = causal and o.mask_convention == "peer" and num_contextual is not None
    contexts32 = num_contextual.to(torch.int32) if peer_contexts else None
    out = call(q, k, v, offsets.to(torch.int32), window, targets32, contexts32)
    if num_contextual is not None and causal and not peer_contexts and num_tokens > 0:
        # non-causal: every row, contextual ones included, already sees all non-candidates.
        # Causal: rows i < C[b] must see exactly keys j < C[b]. A second call runs on the
        # contextual prefixes packed into a [T]-row buffer (sum(C) <= T rows used; the rest
        # is never referenced by its offsets), unmasked, and its rows replace ours.
        lengths = offsets[1:] - offsets[:-1]
        ctx = torch.minimum(num_contextual.to(lengths.dtype), lengths)
        ctx_offsets = lengths_to_offsets(ctx)
        sample = _sample_of_token(offsets, num_tokens)  # [T]
        last_sample = max(num_samples - 1, 0)
        packed_sample = _sample_of_token(ctx_offsets, num_tokens).clamp(max=last_sample)
        slot = torch.arange(num_tokens, device=q.device) - ctx_offsets[packed_sample]
        source = (offsets[packed_sample] + slot).clamp(0, num_tokens - 1)  # [T]
        ctx_out = call(
            q.index_select(0, source), k.index_select(0, source), v.index_select(0, source),
            ctx_offsets.to(torch.int32), (-1, -1), None,
        )
        position = torch.arange(num_tokens, device=q.device) - offsets[sample]
        is_ctx = position < ctx[sample]
        packed_row = (ctx_offsets[sample] + position).clamp(max=num_tokens - 1)
        out = torch.where(is_ctx.view(-1, 1, 1), ctx_out.index_select(0, packed_row), out)
    return out * (max_seqlen / o.scaling_seqlen)
