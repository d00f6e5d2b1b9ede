"""Model FLOPs of an HSTU step and the peak FLOP/s of the device, for TFLOP/s and MFU logs."""

from __future__ import annotations

import time
from functools import cache

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
    a = torch.randn(n, n)
    b = torch.randn(n, n)
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


def hstu_step_flops(
    seqlens: torch.Tensor,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    head_dim: int,
    extra_forward_flops: float = 0.0,
) -> float:
    """Forward + backward FLOPs of the HSTU block for one batch.

    seqlens: [B] tokens per sample after interleaving (contextual + items + actions +
    candidates). Per layer, forward: 2·T·D·4Hd (U/V/Q/K) + 2·T·Hd·D (output projection)
    + 2·Hd·ΣL² (Q Kᵀ and A V, each over the causal half). Backward is twice the forward.
    """
    tokens = float(seqlens.sum())
    sq = float((seqlens.to(torch.float64) ** 2).sum())
    hd = num_heads * head_dim
    per_layer = 2 * tokens * hidden_size * 4 * hd + 2 * tokens * hd * hidden_size + 2 * hd * sq
    return 3.0 * (num_layers * per_layer + extra_forward_flops)
