"""Model FLOPs of an HSTU step and the peak FLOP/s of the device, for TFLOP/s and MFU logs."""

from __future__ import annotations

import time
from functools import cache
from typing import Any

import torch

# Dense (no sparsity) peak TFLOP/s by device name fragment and dtype, from vendor datasheets.
_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H800", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 80.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("A800", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    ("A10", {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2}),
    ("V100", {"bfloat16": 0.0, "float16": 125.0, "float32": 15.7}),
]


@cache
def _measured_cpu_peak() -> float:
    """Best of a few float32 matmuls on this process's threads (FLOP/s); measured once."""
    n = 512
    # a generator of its own: the training streams (dropout) are not drawn from, so a resumed
    # run continues from exactly the checkpoint's RNG state
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype_str: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, table in _PEAK_TFLOPS:
            if fragment in name and table.get(dtype_str):
                return table[dtype_str] * 1e12, f"datasheet {fragment} {dtype_str}"
        return 0.0, f"unknown device {name!r}"
    return _measured_cpu_peak(), "measured float32 matmul on this CPU"


def _sum_min(a: torch.Tensor, b: torch.Tensor, w: int) -> torch.Tensor:
    """sum of min(i, w) over i in [a, b) (elementwise, float64 tensors, a <= b)."""

    def prefix(n: torch.Tensor) -> torch.Tensor:  # sum of min(i, w) over i in [0, n)
        below = torch.minimum(n, torch.full_like(n, w + 1))
        return below * (below - 1) / 2 + (n - below).clamp(min=0) * w

    return prefix(b) - prefix(a)


def attention_pairs(
    seqlens: torch.Tensor, max_attn_len: int = 0, min_full_attn_seq_len: int = 0
) -> torch.Tensor:
    """(query, key) pairs the causal mask keeps per sample, float64 [B]: L (L + 1) / 2, or with
    a window W (``hstu.ops.masks``) each row i sees min(i, W) + 1 keys, except the last M
    (``min_full_attn_seq_len``) rows, which see i + 1 (contextual tokens and candidates are
    counted as history tokens here)."""
    n = seqlens.to(torch.float64)
    full = n * (n + 1) / 2
    if max_attn_len <= 0:
        return full
    start = (n - min_full_attn_seq_len).clamp(min=0) if min_full_attn_seq_len > 0 else n
    windowed = start + _sum_min(torch.zeros_like(n), start, max_attn_len)
    tail = (start + 1 + n) * (n - start) / 2  # rows [start, n) see i + 1 keys each
    return windowed + tail


def hstu_step_flops(seqlens: torch.Tensor, network_args: Any) -> float:
    """Forward + backward FLOPs of the HSTU block NetworkArgs (or an object with its field
    names) describes, for one batch.

    seqlens: [B] tokens per sample after interleaving (contextual + items + actions +
    candidates). Per layer, forward: 2·T·D·4Hd (U/V/Q/K) + 2·T·Hd·D (output projection)
    + 4·Hd·P (Q Kᵀ and A V over the P pairs the mask keeps: :func:`attention_pairs`, with
    the semi-local window ``max_attn_len``, ``min_full_attn_seq_len``). With attention
    truncation the layers above ``attn_truncation_layers`` count each sample's last
    ``attn_truncation_len`` tokens only. Backward is twice the forward.
    """
    n = network_args
    d_model, hd = n.hidden_size, n.num_attention_heads * n.kv_channels
    window = getattr(n, "max_attn_len", 0), getattr(n, "min_full_attn_seq_len", 0)
    truncated = getattr(n, "attn_truncation_layers", 0)

    def layer(lengths: torch.Tensor) -> float:
        tokens = float(lengths.sum())
        pairs = float(attention_pairs(lengths, *window).sum())
        return 2 * tokens * d_model * 4 * hd + 2 * tokens * hd * d_model + 4 * hd * pairs

    if truncated > 0:
        short = seqlens.clamp(max=n.attn_truncation_len)
        total = truncated * layer(seqlens) + (n.num_layers - truncated) * layer(short)
    else:
        total = n.num_layers * layer(seqlens)
    return 3.0 * total


def step_flops(seqlens: torch.Tensor, network_args: Any) -> float:
    """Forward + backward FLOPs of one batch (seqlens [B] tokens per sample) through the
    sequence block of ``NetworkArgs.architecture``: :func:`hstu_step_flops`,
    :func:`hstu.model.sasrec.sasrec_step_flops`, or 0 for the MLP baseline (no block)."""
    architecture = getattr(network_args, "architecture", "hstu")
    if architecture == "sasrec":
        from hstu.model.sasrec import sasrec_step_flops

        return sasrec_step_flops(seqlens, network_args)
    if architecture != "hstu":
        return 0.0
    return hstu_step_flops(seqlens, network_args)
