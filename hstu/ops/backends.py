"""Choosing the attention backend that actually runs, and saying so when it differs.

The backends are registered by name in ``hstu.registry.ATTENTION_BACKENDS`` (kernel, why it
cannot run a call, and what runs instead); this module walks that fallback chain.

``resolve_backend`` never fails silently: each distinct fallback prints one line (once per
process) naming the backend asked for, the reason, and what runs instead; ``strict=True``
raises ``BackendUnavailableError`` instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

from hstu.registry import ATTENTION_BACKENDS, load

TRITON_MAX_HEAD_DIM = 256

_reported: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """The requested attention backend cannot run here and ``strict`` forbids a fallback."""


def triton_interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(
    head_dim: int, value_head_dim: int, device: torch.device,
    dtype: torch.dtype | None = None, causal: bool = True, has_targets: bool = False,
) -> str | None:
    """None when our triton kernel can run this call, else a short reason (the registry's
    signature; dtype, causal and has_targets do not limit it)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cpu":
        if not triton_interpret_requested():
            return "no CUDA device and TRITON_INTERPRET is not set"
    elif device.type != "cuda":
        return f"device type {device.type!r} is not supported"
    if value_head_dim != head_dim:
        return f"q/k head dim {head_dim} differs from v head dim {value_head_dim}"
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"head dim {head_dim} > {TRITON_MAX_HEAD_DIM}"
    return None


def triton_hstu_attention(*args, **kwargs):
    """The triton kernel of the current TRITON_INTERPRET setting (:func:`triton_module`)."""
    return triton_module().triton_hstu_attention(*args, **kwargs)


def triton_module() -> ModuleType:
    """hstu.ops.triton_attention, (re)decorated to match the current TRITON_INTERPRET."""
    name = "hstu.ops.triton_attention"
    module = sys.modules.get(name) or importlib.import_module(name)
    if module.INTERPRETED != triton_interpret_requested():
        module = importlib.reload(module)
    return module


def resolve_backend(
    name: str,
    head_dim: int,
    device: torch.device,
    strict: bool = False,
    *,
    value_head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    causal: bool = True,
    has_targets: bool = False,
) -> str:
    """The backend that will run for a call asking for ``name``.

    Args:
        name: a registered backend ("pytorch" | "triton" | "cutlass").
        head_dim: d of q and k.
        device: where q lives.
        strict: raise ``BackendUnavailableError`` instead of falling back.
        value_head_dim, dtype, causal, has_targets: further properties of the call that
            limit the cutlass (and triton) kernels; defaults describe a plain causal call.

    Returns:
        The name that runs: ``name`` itself, else the first of its fallbacks that can run
        (cutlass -> triton -> pytorch, which runs everywhere).
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {ATTENTION_BACKENDS.names()}"
        )
    device = torch.device(device)
    value_head_dim = head_dim if value_head_dim is None else value_head_dim

    def why_not(backend: str) -> str | None:
        check = ATTENTION_BACKENDS[backend].unavailable
        if check is None:
            return None
        return load(check)(head_dim, value_head_dim, device, dtype, causal, has_targets)

    reason = why_not(name)
    if reason is None:
        return name
    chosen = ATTENTION_BACKENDS[name].fallback
    while chosen is not None and why_not(chosen) is not None:
        chosen = ATTENTION_BACKENDS[chosen].fallback
    if chosen is None:
        raise BackendUnavailableError(
            f"hstu_attention: backend '{name}' cannot run here ({reason}) and no fallback can"
        )
    message = (
        f"hstu_attention: backend '{name}' cannot run here ({reason}); running '{chosen}' instead"
    )
    if strict:
        raise BackendUnavailableError(message.replace(f"; running '{chosen}' instead", " [strict]"))
    if message not in _reported:
        _reported.add(message)
        print(message, file=sys.stderr, flush=True)
    return chosen
