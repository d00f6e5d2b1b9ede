#!/usr/bin/env python
"""Benchmark of the HSTU attention backends (prints figures; not a test).

    .venv/bin/python scripts/bench_attention.py                 # CPU: lengths 64..1024
    python scripts/bench_attention.py --device cuda             # GPU: lengths 256..4096

Per backend and sequence length: forward+backward time of one attention call and of one
HSTU-like layer (LayerNorm, U/V/Q/K projection + SiLU, attention, LayerNorm(O) * U, output
projection, residual), achieved FLOP/s and peak memory; then jagged vs padded-dense on a zipf
length mix; on a GPU also the triton/cutlass and triton/pytorch speed ratios at length 1024.

FLOPs are model FLOPs of the attention over the pairs the mask allows (4 * H * d per pair
forward, twice that backward; the backward's recompute is not counted), plus 2 * in * out per
token for each linear layer in the layer benchmark. Peak memory: CUDA allocator peak on a GPU;
on CPU the growth of the process's peak resident set (Linux VmHWM, reset before each run).
Triton on CPU runs in its interpreter, which says nothing about speed: it is skipped there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hstu.ops import dense_mask, hstu_attention, lengths_to_offsets, resolve_backend
from hstu.ops.backends import triton_unavailable_reason
from hstu.ops.cutlass_attention import unavailable_reason as cutlass_unavailable_reason


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a region: CUDA allocator peak, or Linux peak-RSS growth on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - no typing_extensions needed
        self.peak_bytes: int | None = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
                self.base = self._status_kib("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.base is not None:
            peak = self._status_kib("VmHWM")
            self.peak_bytes = None if peak is None else (peak - self.base) * 1024


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:8.1f} MiB"


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], None], device: torch.device, repeat: int) -> float:
    """Best (minimum) seconds of fn() after one warm-up call: robust to a shared machine."""
    fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return min(samples)


def allowed_pairs(lengths: Tensor, num_targets: Tensor, group: int) -> int:
    """Number of (query, key) pairs the causal + target-group mask allows, summed over samples."""
    total = 0
    for length, tgt in zip(lengths.tolist(), num_targets.tolist()):
        mask = dense_mask(torch.tensor([length]), None, torch.tensor([tgt]), group, True, length)
        total += int(mask.sum())
    return total


# ----------------------------------------------------------------------------- workloads
class Workload:
    """One jagged batch: B samples, H heads, d head dim, candidates at the end of each sample."""

    def __init__(
        self,
        lengths: list[int],
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        num_candidates: int,
        group: int,
    ) -> None:
        self.lengths = torch.tensor(lengths, dtype=torch.int64)
        self.offsets = lengths_to_offsets(self.lengths).to(device)
        self.max_seqlen = max(lengths)
        self.total = sum(lengths)
        self.heads, self.head_dim, self.dtype, self.device = heads, head_dim, dtype, device
        tgt = torch.clamp(self.lengths // 4, max=num_candidates)
        self.num_targets = tgt.to(device)
        self.group = group
        self.pairs = allowed_pairs(self.lengths, tgt, group)

    def qkv(self) -> list[Tensor]:
        shape = (self.total, self.heads, self.head_dim)
        return [
            torch.randn(shape, device=self.device, dtype=self.dtype, requires_grad=True)
            for _ in range(3)
        ]

    def attention_flops(self) -> float:
        return 3 * 4 * self.pairs * self.heads * self.head_dim

    def attend(self, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        return hstu_attention(
            q,
            k,
            v,
            self.offsets,
            self.max_seqlen,
            alpha=self.head_dim**-0.5,
            scaling_seqlen=self.max_seqlen,
            num_targets=self.num_targets,
            target_group_size=self.group,
            backend=backend,
            strict=True,
        )


class HstuLikeLayer(torch.nn.Module):
    """The layer of docs/model.md "Layer math", in plain torch around one attention call."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_in = torch.nn.LayerNorm(width)
        self.uvqk = torch.nn.Linear(width, 4 * width)
        self.norm_out = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x: Tensor, work: Workload, backend: str) -> Tensor:
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)
        shape = (x.shape[0], self.heads, self.head_dim)
        o = work.attend(q.reshape(shape), k.reshape(shape), v.reshape(shape), backend)
        return x + self.proj(self.norm_out(o.reshape(x.shape)) * u)

    def linear_flops(self, tokens: int) -> float:
        width = self.heads * self.head_dim
        return 3 * 2 * tokens * (width * 4 * width + width * width)


def padded_dense_attention(q: Tensor, k: Tensor, v: Tensor, work: Workload) -> Tensor:
    """What a non-jagged kernel does: pad every sample to the max length, mask, unpad."""
    n, b = work.max_seqlen, len(work.lengths)
    lengths = work.lengths.to(q.device)
    slot = torch.arange(n, device=q.device)
    valid = slot.view(1, -1) < lengths.view(-1, 1)
    index = torch.where(valid, work.offsets[:-1].view(-1, 1) + slot.view(1, -1), 0)
    qp, kp, vp = (x[index].float() for x in (q, k, v))  # [B, n, H, d]
    scores = work.head_dim**-0.5 * torch.einsum("bihd,bjhd->bhij", qp, kp)
    mask = dense_mask(lengths, None, work.num_targets, work.group, True, n).view(b, 1, n, n)
    weights = torch.where(mask, F.silu(scores), 0.0) / n
    return torch.einsum("bhij,bjhd->bihd", weights, vp)[valid].to(q.dtype)


# ----------------------------------------------------------------------------- runs
def run_backward(out: Tensor) -> None:
    out.backward(torch.ones_like(out))


def bench_attention(work: Workload, backend: str, repeat: int) -> tuple[float, int | None]:
    q, k, v = work.qkv()

    def step() -> None:
        run_backward(work.attend(q, k, v, backend))

    seconds = timed(step, work.device, repeat)
    with PeakMemory(work.device) as mem:
        step()
    return seconds, mem.peak_bytes


def bench_layer(work: Workload, backend: str, repeat: int) -> tuple[float, float]:
    layer = HstuLikeLayer(work.heads, work.head_dim).to(work.device, work.dtype)
    x = torch.randn(
        work.total,
        work.heads * work.head_dim,
        device=work.device,
        dtype=work.dtype,
        requires_grad=True,
    )
    seconds = timed(lambda: run_backward(layer(x, work, backend)), work.device, repeat)
    return seconds, work.attention_flops() + layer.linear_flops(work.total)


def available_backends(args: argparse.Namespace, device: torch.device) -> list[str]:
    found = ["pytorch"]
    if (
        triton_unavailable_reason(args.head_dim, args.head_dim, device) is None
        and device.type == "cuda"
    ):
        found.append("triton")
    else:
        print(
            f"# triton skipped: {'interpreted on CPU, timings meaningless' if device.type == 'cpu' else triton_unavailable_reason(args.head_dim, args.head_dim, device)}"
        )
    reason = cutlass_unavailable_reason(
        args.head_dim, args.head_dim, device, args.torch_dtype, True, True
    )
    if reason is None:
        found.append("cutlass")
    else:
        print(f"# cutlass skipped: {reason}")
    return found


def zipf_lengths(batch: int, max_len: int, exponent: float, seed: int) -> list[int]:
    """Lengths with P(L) ~ L^-exponent on [16, max_len] (many short, few long samples)."""
    gen = torch.Generator().manual_seed(seed)
    support = torch.arange(16, max_len + 1, dtype=torch.float64)
    probs = support.pow(-exponent)
    picks = torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=gen)
    lengths = support[picks].long().tolist()
    lengths[0] = max_len  # the batch's max length is the padded width
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-candidates", type=int, default=16)
    parser.add_argument("--target-group-size", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--zipf-exponent", type=float, default=1.2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed mmap threshold makes glibc hand large freed blocks back to the OS, so the
        # resident-set peak measures live tensors instead of the allocator's cache.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if not gpu:
        torch.set_num_threads(args.threads)
    args.lengths = args.lengths or (
        [256, 512, 1024, 2048, 4096] if gpu else [64, 128, 256, 512, 1024]
    )
    args.batch_size = args.batch_size or (32 if gpu else 4)
    args.heads = args.heads or (4 if gpu else 2)
    args.repeat = args.repeat or (10 if gpu else 3)
    args.torch_dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"# device {name}, dtype {args.torch_dtype}, B={args.batch_size}, H={args.heads}, "
        f"d={args.head_dim}, candidates<= {args.num_candidates} (group {args.target_group_size}), "
        f"best of {args.repeat}"
    )
    backends = available_backends(args, device)
    for b in backends:
        assert resolve_backend(b, args.head_dim, device, strict=True) == b

    print("\n## one attention call, forward + backward (full-length samples)")
    print(
        f"{'backend':8} {'len':>5} {'ms':>9} {'TFLOP/s':>9} {'peak mem':>12}   | layer ms  layer TFLOP/s"
    )
    times: dict[tuple[str, int], float] = {}
    # every workload's heads, head dim, dtype, device, candidates and group size
    shape = (args.heads, args.head_dim, args.torch_dtype, device, args.num_candidates,
             args.target_group_size)
    for length in args.lengths:
        work = Workload([length] * args.batch_size, *shape)
        for backend in backends:
            seconds, peak = bench_attention(work, backend, args.repeat)
            times[(backend, length)] = seconds
            layer_s, layer_flops = bench_layer(work, backend, args.repeat)
            print(
                f"{backend:8} {length:5d} {seconds * 1e3:9.2f} "
                f"{work.attention_flops() / seconds / 1e12:9.4f} {fmt_bytes(peak):>12}   | "
                f"{layer_s * 1e3:8.2f}  {layer_flops / layer_s / 1e12:9.4f}"
            )

    max_len = max(args.lengths)
    lengths = zipf_lengths(args.batch_size * 4, max_len, args.zipf_exponent, seed=1)
    work = Workload(lengths, *shape)
    print(
        f"\n## jagged vs padded-dense, zipf lengths (B={len(lengths)}, max {max_len}, "
        f"mean {sum(lengths) / len(lengths):.0f}, {work.total} tokens; padded = "
        f"{len(lengths) * max_len} slots)"
    )
    q, k, v = work.qkv()
    rows = [("padded-dense", lambda: run_backward(padded_dense_attention(q, k, v, work)))]
    rows += [(f"jagged {b}", lambda b=b: run_backward(work.attend(q, k, v, b))) for b in backends]
    for label, step in rows:
        seconds = timed(step, device, args.repeat)
        with PeakMemory(device) as mem:
            step()
        print(
            f"{label:16} {seconds * 1e3:9.2f} ms  {work.attention_flops() / seconds / 1e12:9.4f} "
            f"TFLOP/s (useful)  peak {fmt_bytes(mem.peak_bytes)}"
        )

    if gpu and 1024 in args.lengths and ("triton", 1024) in times:
        tri = times[("triton", 1024)]
        print("\n## speed ratios at length 1024 (higher = triton faster)")
        if ("cutlass", 1024) in times:
            ratio = times[("cutlass", 1024)] / tri
            print(f"triton/cutlass speed {ratio:.2f}x (target >= 0.5x)")
        else:
            print("triton/cutlass speed: cutlass not available here")
        ratio = times[("pytorch", 1024)] / tri
        print(f"triton/pytorch speed {ratio:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
