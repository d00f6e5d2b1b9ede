"""One command for a lent GPU: everything this project can learn from one, in one call.

    python -m hstu.gpu_check [--json gpu_check.json] [--budget-s 570]
    python -m hstu.gpu_check --dry-run        # any host: list the checks, exit 0

Runs on a bare CUDA machine with torch and triton only: torchrec, fbgemm, megatron-core and
gin-config are optional; each part that needs one says so in one line and is skipped. The
checks (``CHECKS``) print one table and write one JSON file (``SCHEMA``); docs/kernels.md
describes both. The exit status is 0 when nothing failed, 1 otherwise, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

SCHEMA = "hstu.gpu_check/1"
DEFAULT_BUDGET_S = 570.0  # one device call may run 10 minutes; keep 30 s for start and copy
PYTEST_TIMEOUT_S = 240.0

# name -> what it runs; the order is the run order (docs/kernels.md lists the same names)
CHECKS: dict[str, str] = {
    "environment": "torch, CUDA and triton versions, the device, which optional packages exist",
    "pytest_gpu": "pytest -m gpu over the test files that hold gpu-marked tests",
    "kernels_vs_reference": (
        "triton and cutlass vs the pytorch backend, values and gradients: fp32 and bf16 "
        "(cutlass bf16), causal / contextual / targets / rab, lengths 1..4096"
    ),
    "kernel_throughput": (
        "fwd+bwd TFLOP/s of each attention backend in bf16 at lengths 1024 and 4096, "
        "and the share of the datasheet peak"
    ),
    "block_throughput": (
        "fwd+bwd TFLOP/s of the dense HSTU block (HSTUBlock, triton, bf16) and the share "
        "of the datasheet peak"
    ),
    "sync_free_steps": (
        "20 training steps of the dense block (block + loss + fused AdamW) under "
        "torch.cuda.set_sync_debug_mode('error'), after one warm-up step"
    ),
    "trainer_steps": (
        "one full trainer step (input stage, TorchRec tables, dense block, loss, optimizers) of "
        "every preset in configs/ that fits this machine (its GPUs, its data, its memory: a "
        "skip line says which does not) under torch.cuda.set_sync_debug_mode('error'), after "
        "one warm-up step (needs torchrec, fbgemm_gpu, megatron-core and gin)"
    ),
}
OPTIONAL_MODULES = {
    "megatron.core": "tensor parallel layers only (the TP=1 block here does not need it)",
    "gin": "configs and the trainer (trainer_steps)",
    "torchrec": "embedding tables and the trainer (trainer_steps)",
    "fbgemm_gpu": "cutlass attention (fbgemm_gpu.experimental.hstu) and tables",
}
ROW_KEYS = ("check", "case", "result", "status")
RESULT_KEYS = ("schema", "dry_run", "environment", "checks")
CHECK_KEYS = ("name", "description", "status", "seconds", "summary", "rows")


class SkipPart(Exception):
    """A part that cannot run on this machine; its message is the one line shown."""


@dataclass
class CheckResult:
    name: str
    description: str
    status: str = "planned"  # planned | pass | fail | skip | error
    seconds: float = 0.0
    summary: str = ""
    rows: list[dict[str, str]] = field(default_factory=list)

    def row(self, case: str, result: str, ok: bool | None) -> None:
        status = "skip" if ok is None else ("pass" if ok else "fail")
        self.rows.append({"check": self.name, "case": case, "result": result, "status": status})
        # printed as it comes: a run cut off by its caller's time limit still shows its rows
        print(f"  {self.name} | {case} | {result} | {status}", flush=True)


# ------------------------------------------------------------------------------- helpers


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is absent or broken
        return False


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` and the innermost frame of this project, as ``at file:line``."""
    text = str(exc).strip().splitlines()
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/hstu/" in f.filename]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {text[0] if text else ''}{where}"


def _time_ms(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def import_dense_block() -> type:
    """HSTUBlock: its modules (hstu_block, hstu_layer, jagged, tensor_parallel) need torch
    only, and megatron-core only with a TP group (hstu.model's __init__ loads nothing)."""
    try:
        from hstu.model.hstu_block import HSTUBlock
    except ModuleNotFoundError as exc:
        hint = "carry its wheel (docs/kernels.md, 'GPU check')"
        raise SkipPart(f"the dense HSTU block needs {exc.name}, absent here; {hint}") from exc
    return HSTUBlock


def _jagged_batch(
    lengths: list[int], num_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, num_heads, head_dim, device="cuda", generator=gen)
        .to(dtype)
        .requires_grad_()
        for _ in range(3)
    )
    offsets = torch.tensor([0, *lengths], device="cuda").cumsum(0)
    return q, k, v, offsets


# ------------------------------------------------------------------------------- checks


def check_environment(result: CheckResult) -> None:
    import triton

    cap = torch.cuda.get_device_capability()
    result.row("device", f"{torch.cuda.get_device_name()} sm{cap[0]}{cap[1]}", True)
    result.row("versions", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"triton {triton.__version__}", True)
    for name, use in OPTIONAL_MODULES.items():
        present = _module_present(name)
        result.row(name, "present" if present else f"absent: {use}", True if present else None)
    result.summary = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


def gpu_test_files(root: Path) -> list[Path]:
    tests = root / "tests"
    if not tests.is_dir():
        return []
    return sorted(p for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text())


def check_pytest_gpu(result: CheckResult, timeout_s: float) -> None:
    if not _module_present("pytest"):
        raise SkipPart("pytest is not installed; carry its wheels (docs/kernels.md, 'GPU check')")
    root = _repo_root()
    files = gpu_test_files(root)
    if not files:
        raise SkipPart(f"no tests/ with gpu-marked tests under {root}")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               *[str(p.relative_to(root)) for p in files]]
    try:
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        result.row("pytest -m gpu", f"timed out after {timeout_s:.0f} s", False)
        result.summary = "timed out"
        return
    lines = [ln for ln in done.stdout.strip().splitlines() if ln.strip()]
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            result.row("pytest", line[:160], False)
        elif line.startswith("SKIPPED"):
            result.row("pytest", line[:160], None)
    last = lines[-1] if lines else done.stderr.strip()[-160:]
    ok = done.returncode == 0
    result.row("pytest -m gpu " + " ".join(p.name for p in files), last, ok)
    result.summary = last


CASES = {
    "causal": {"ctx": None, "tgt": None, "rab": False},
    "contextual": {"ctx": [0, 1, 1, 8, 20, 40], "tgt": None, "rab": False},
    "targets": {"ctx": None, "tgt": [1, 1, 5, 16, 50, 100], "rab": False},
    "rab": {"ctx": [0, 0, 2, 4, 8, 16], "tgt": [1, 1, 5, 16, 50, 100], "rab": True},
}
REFERENCE_LENGTHS = [1, 2, 17, 128, 1000, 4096]


def _attention_case(case: str, dtype: torch.dtype, head_dim: int = 64) -> tuple[tuple, dict]:
    from hstu.ops import RelativeAttentionBias

    spec = CASES[case]
    num_heads = 2
    q, k, v, offsets = _jagged_batch(REFERENCE_LENGTHS, num_heads, head_dim, dtype, seed=3)
    max_seqlen = max(REFERENCE_LENGTHS)

    def counts(values: list[int] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, device="cuda")

    rab = None
    if spec["rab"]:
        gen = torch.Generator(device="cuda").manual_seed(4)
        pos = (0.1 * torch.randn(2 * max_seqlen - 1, device="cuda", generator=gen)).to(dtype)
        ts = (0.1 * torch.randn(129, device="cuda", generator=gen)).to(dtype)
        stamps = torch.randint(0, 5000, (q.shape[0],), device="cuda", generator=gen).cumsum(0)
        rab = RelativeAttentionBias(pos.requires_grad_(), ts.requires_grad_(), stamps)
    kw = {
        "alpha": head_dim**-0.5,
        "scaling_seqlen": max_seqlen,
        "num_contextual": counts(spec["ctx"]),
        "num_targets": counts(spec["tgt"]),
        "target_group_size": 2,
        "rab": rab,
    }
    return (q, k, v, offsets, max_seqlen), kw


def _max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.detach().float()
    scale = want.abs().max().clamp(min=1e-6)
    return float((got.detach().float() - want).abs().max() / scale)


GRAD_NAMES = ("out", "dq", "dk", "dv", "dpos", "dts")
FP32_TOLERANCE = 1e-4  # fp32 kernels against the fp32 pytorch backend
BF16_FACTOR = 2.0  # bf16 kernels: at most this times the bf16 pytorch backend's own error
BF16_FLOOR = 1e-3  # ... or this, whichever is larger (both against an fp32 reference)


def _outputs(backend: str, args: tuple, kw: dict, leaves: list[torch.Tensor],
             upstream: torch.Tensor) -> list[torch.Tensor]:
    from hstu.ops import hstu_attention

    strict = {} if backend == "pytorch" else {"strict": True}
    out = hstu_attention(*args, backend=backend, **strict, **kw)
    return [out, *torch.autograd.grad(out, leaves, upstream.to(out.dtype))]


def _as_float32(args: tuple, kw: dict) -> tuple[tuple, dict, list[torch.Tensor]]:
    """The same case with every floating input cast to float32 (the bf16 values, exactly)."""
    q, k, v = (x.detach().float().requires_grad_() for x in args[:3])
    kw = dict(kw)
    leaves = [q, k, v]
    if kw["rab"] is not None:
        rab = kw["rab"]
        pos, ts = (w.detach().float().requires_grad_() for w in (rab.pos_weights, rab.ts_weights))
        kw["rab"] = dataclasses.replace(rab, pos_weights=pos, ts_weights=ts)
        leaves += [pos, ts]
    return (q, k, v, *args[3:]), kw, leaves


def check_kernels_vs_reference(result: CheckResult) -> None:
    """fp32: each output and gradient within FP32_TOLERANCE (relative to its largest value) of
    the fp32 pytorch backend. bf16: both the kernel and the bf16 pytorch backend are compared
    with the pytorch backend run in fp32 on the same (bf16-valued) inputs; the kernel's error
    may be at most BF16_FACTOR times the bf16 reference's own (or BF16_FLOOR): rounding in
    bf16 is expected, more of it than the reference has is not. The triton kernels run their
    default tiles (HSTU_TRITON_AUTOTUNE=0 here): tuning would time five tile choices for each
    of the 16 kernel variants, minutes of compilation that tell nothing about the values."""
    previous = os.environ.get("HSTU_TRITON_AUTOTUNE")
    os.environ["HSTU_TRITON_AUTOTUNE"] = "0"
    try:
        _kernels_vs_reference(result)
    finally:
        if previous is None:
            del os.environ["HSTU_TRITON_AUTOTUNE"]
        else:
            os.environ["HSTU_TRITON_AUTOTUNE"] = previous


def _kernels_vs_reference(result: CheckResult) -> None:
    from hstu.ops.cutlass_attention import unavailable_reason

    worst = 0.0
    for backend in ("triton", "cutlass"):
        for dtype in (torch.float32, torch.bfloat16):
            if backend == "cutlass":
                why = unavailable_reason(64, 64, torch.device("cuda"), dtype, True, True)
                if why is not None:
                    result.row(f"cutlass {str(dtype)[6:]}", f"skipped: {why}", None)
                    continue
            for case in CASES:
                args, kw = _attention_case(case, dtype)
                leaves = list(args[:3])
                if kw["rab"] is not None:
                    leaves += [kw["rab"].pos_weights, kw["rab"].ts_weights]
                upstream = torch.randn(args[0].shape, device="cuda", dtype=torch.float32)
                got = _outputs(backend, args, kw, leaves, upstream)
                label = f"{backend} {str(dtype)[6:]} {case}"
                if dtype == torch.float32:
                    want = _outputs("pytorch", args, kw, leaves, upstream)
                    errors = [_max_relative_error(a, b) for a, b in zip(got, want)]
                    err, at = max(zip(errors, GRAD_NAMES))
                    ok = math.isfinite(err) and err <= FP32_TOLERANCE
                    detail = f"max rel err {err:.1e} at {at} (tol {FP32_TOLERANCE:.0e})"
                else:
                    args32, kw32, leaves32 = _as_float32(args, kw)
                    exact = _outputs("pytorch", args32, kw32, leaves32, upstream)
                    same = _outputs("pytorch", args, kw, leaves, upstream)
                    errors = [_max_relative_error(a, b) for a, b in zip(got, exact)]
                    baseline = [_max_relative_error(a, b) for a, b in zip(same, exact)]
                    limits = [max(BF16_FACTOR * b, BF16_FLOOR) for b in baseline]
                    ratio, at, err, base = max(
                        (e / lim, name, e, b)
                        for e, lim, name, b in zip(errors, limits, GRAD_NAMES, baseline)
                    )
                    ok = math.isfinite(err) and ratio <= 1.0
                    detail = (f"vs fp32: max rel err {err:.1e} at {at}, bf16 pytorch "
                              f"{base:.1e} there (limit {BF16_FACTOR:g}x or {BF16_FLOOR:.0e}); "
                              f"worst of all: {max(errors):.1e}")
                worst = max(worst, max(errors))
                result.row(label, detail, ok)
    result.summary = f"worst relative error {worst:.1e}"


def attention_flops(lengths: list[int], num_heads: int, head_dim: int) -> float:
    """Forward + backward model FLOPs of causal attention (hstu.training.flops convention:
    forward 2 H d sum(L^2), backward twice that)."""
    return 3.0 * 2.0 * num_heads * head_dim * float(sum(n * n for n in lengths))


def check_kernel_throughput(result: CheckResult) -> None:
    from hstu.ops import hstu_attention
    from hstu.ops.cutlass_attention import unavailable_reason
    from hstu.training.flops import peak_flops  # torch only

    peak, source = peak_flops(torch.device("cuda"), "bfloat16")
    num_heads, head_dim = 4, 128
    best = 0.0
    for length in (1024, 4096):
        lengths = [length] * max(1, 32768 // length)
        for backend in ("pytorch", "triton", "cutlass"):
            if backend == "cutlass":
                why = unavailable_reason(
                    head_dim, head_dim, torch.device("cuda"), torch.bfloat16, True, False
                )
                if why is not None:
                    result.row(f"cutlass L={length}", f"skipped: {why}", None)
                    continue
            q, k, v, offsets = _jagged_batch(lengths, num_heads, head_dim, torch.bfloat16, 5)
            upstream = torch.randn_like(q)

            def step(q=q, k=k, v=v, offsets=offsets, upstream=upstream, backend=backend,
                     length=length) -> None:
                out = hstu_attention(q, k, v, offsets, length, alpha=head_dim**-0.5,
                                     scaling_seqlen=length, backend=backend, strict=True)
                torch.autograd.grad(out, (q, k, v), upstream)

            ms = _time_ms(step, warmup=2, repeats=3 if backend == "pytorch" else 10)
            tflops = attention_flops(lengths, num_heads, head_dim) / (ms * 1e-3) / 1e12
            best = max(best, tflops)
            share = f", {100 * tflops * 1e12 / peak:.1f}% of {source}" if peak else ""
            result.row(f"{backend} L={length} B={len(lengths)}",
                       f"{ms:.2f} ms, {tflops:.1f} TFLOP/s{share}", True)
    result.summary = f"best {best:.1f} TFLOP/s (bf16, H={num_heads}, d={head_dim})"


BLOCK_SHAPE = {"num_layers": 4, "hidden_size": 512, "num_heads": 4, "head_dim": 128}


def _build_block(block_cls: type) -> torch.nn.Module:
    return block_cls(
        BLOCK_SHAPE["num_layers"], BLOCK_SHAPE["hidden_size"], BLOCK_SHAPE["num_heads"],
        BLOCK_SHAPE["head_dim"], kernel_backend="triton", strict_kernel=True,
        dtype=torch.bfloat16,
    ).cuda()


def _block_batch(lengths: list[int], num_targets: list[int] | None) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(sum(lengths), BLOCK_SHAPE["hidden_size"], device="cuda", generator=gen)
    return {
        "x": x.to(torch.bfloat16),
        "offsets": torch.tensor([0, *lengths], device="cuda").cumsum(0),
        "max_seqlen": max(lengths),  # known on the host, as the data path knows it
        "num_targets": None if num_targets is None else torch.tensor(num_targets, device="cuda"),
    }


def check_block_throughput(result: CheckResult) -> None:
    from hstu.training.flops import hstu_step_flops, peak_flops

    block_cls = import_dense_block()
    peak, source = peak_flops(torch.device("cuda"), "bfloat16")
    block = _build_block(block_cls)
    shape = SimpleNamespace(  # NetworkArgs' names
        num_layers=BLOCK_SHAPE["num_layers"], hidden_size=BLOCK_SHAPE["hidden_size"],
        num_attention_heads=BLOCK_SHAPE["num_heads"], kv_channels=BLOCK_SHAPE["head_dim"],
    )
    for length in (512, 2048):
        lengths = [length] * max(1, 32768 // length)
        batch = _block_batch(lengths, None)

        def step(batch=batch) -> None:
            out = block(batch["x"], batch["offsets"], batch["max_seqlen"])
            out.float().square().mean().backward()

        ms = _time_ms(step, warmup=2, repeats=5)
        flops = hstu_step_flops(torch.tensor(lengths), shape)
        tflops = flops / (ms * 1e-3) / 1e12
        share = f", {100 * tflops * 1e12 / peak:.1f}% of {source}" if peak else ""
        result.row(f"HSTUBlock L={length} B={len(lengths)}",
                   f"{ms:.2f} ms, {tflops:.1f} TFLOP/s{share}", True)
        result.summary = f"{tflops:.1f} TFLOP/s at L={length} ({BLOCK_SHAPE})"


SYNC_FREE_STEPS = 20


def check_sync_free_steps(result: CheckResult) -> None:
    block_cls = import_dense_block()
    block = _build_block(block_cls)
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 1024, (32,), generator=gen).tolist()
    targets = [min(8, n) for n in lengths]
    batch = _block_batch(lengths, targets)

    def train_step() -> torch.Tensor:
        out = block(batch["x"], batch["offsets"], batch["max_seqlen"],
                    num_targets=batch["num_targets"])
        loss = out.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    train_step()  # compiles and tunes the kernels (timed choices wait for the GPU)
    torch.cuda.synchronize()
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_FREE_STEPS):
            losses.append(train_step())
    except RuntimeError as exc:
        result.row(f"step {len(losses) + 1}", _one_line(exc), False)
        result.summary = f"host sync in step {len(losses) + 1}"
        return
    finally:
        torch.cuda.set_sync_debug_mode(0)
    values = torch.stack(losses).tolist()
    finite = all(math.isfinite(x) for x in values)
    result.row(f"{SYNC_FREE_STEPS} steps", f"no host sync; loss {values[0]:.4g} -> "
               f"{values[-1]:.4g}", finite)
    result.summary = "no host sync" if finite else "non-finite loss"


TRAINER_NEEDS = ("torchrec", "fbgemm_gpu", "megatron.core", "gin")
METADATA_FILE = "metadata.json"  # hstu.data.layout.METADATA_FILE (gin-free here: the dry run)
OUT_OF_MEMORY_EXIT = 3  # a preset's step process: CUDA ran out of memory
MIN_PRESET_S = 30.0  # a preset is not started with less of the budget left


@dataclass(frozen=True)
class PresetPlan:
    """One preset of configs/ as ``trainer_steps`` treats it on this machine: stepped (with
    ``params``, ``{workdir}`` standing for its scratch folder) or skipped, ``skip`` saying why."""

    preset: str  # the file's stem, e.g. "ml-1m_retrieval"
    task: str  # "ranking" | "retrieval"
    params: tuple[str, ...] = ()
    skip: str | None = None


def _gin_value(text: str, key: str) -> str | None:
    """The value a preset binds ``key`` to (quotes and a trailing comment dropped), or None."""
    import re

    found = re.search(rf"^{re.escape(key)}\s*=\s*([^#\n]*)", text, re.MULTILINE)
    return found.group(1).strip().strip("\"'") if found else None


def _preset_text(path: Path) -> str:
    """A preset's text followed by its includes' (relative to it): :func:`_gin_value` finds the
    preset's own binding of a key before an included file's, as gin binds them (gin-free, as
    the dry run is: hstu.gin_parsing.read_bindings needs gin)."""
    import re

    text = path.read_text()
    included = re.findall(r"""^include\s+['"]([^'"]+)['"]""", text, re.MULTILINE)
    return "\n".join([text, *(_preset_text(path.parent / name) for name in included)])


def trainer_presets(root: Path, num_gpus: int) -> list[PresetPlan]:
    """Every preset in ``root``/configs (the debug ones first), and whether ``trainer_steps``
    steps it on a machine of ``num_gpus`` GPUs with the data under ``root``: a preset needs
    its tensor-parallel GPUs, and its data (the synthetic and benchmark sets are made on the
    spot; a preprocessed one must be under its dataset_path). Whether it fits the GPU's
    memory is found by trying: an out-of-memory step is a skip line, not a failure."""
    paths = sorted((root / "configs").glob("*.gin"),
                   key=lambda p: (not p.stem.startswith("debug_"), p.stem))
    plans = []
    for path in paths:
        text, name = _preset_text(path), path.stem
        task = "ranking" if "ranking" in name else "retrieval"
        tp = int(_gin_value(text, "TensorModelParallelArgs.tensor_model_parallel_size") or 1)
        dataset = _gin_value(text, "DatasetArgs.dataset_name")
        data_path = _gin_value(text, "DatasetArgs.dataset_path") or f"tmp_data/{dataset}"
        params: tuple[str, ...] = ()
        skip = None
        if tp > num_gpus:
            skip = (f"needs {tp} GPUs (TensorModelParallelArgs.tensor_model_parallel_size={tp}); "
                    f"this machine has {num_gpus}")
        elif "BenchmarkDatasetArgs." in text:
            pass  # in-memory random batches
        elif dataset == "synthetic":  # generated into the scratch folder on first use
            params = (f'DatasetArgs.dataset_path="{{workdir}}/data/{name}"',)
        elif dataset == "stream":
            skip = ("an online-training preset: it trains window by window over a stream "
                    "folder (StreamArgs.path) or a replay of a raw log, neither on this machine")
        elif not (root / data_path / METADATA_FILE).is_file():
            skip = (f"its data is not on this machine ({data_path}/{METADATA_FILE}): "
                    f"python -m hstu.data.preprocess --dataset {dataset}")
        plans.append(PresetPlan(name, task, params, skip))
    return plans


def _trainer_step_in_process(preset: str, task: str, params: list[str], workdir: str) -> str:
    """Builds the trainer of configs/<preset>.gin in this process (a world of 1), runs one
    warm-up step, then one step with CUDA's sync debug mode raising; returns the loss line.
    Out of GPU memory: prints why on stderr and exits with OUT_OF_MEMORY_EXIT."""
    import gin

    from hstu.config import load_config
    from hstu.training.run import with_trainer

    root = _repo_root()
    gin.clear_config()
    cfg = load_config(str(root / "configs" / f"{preset}.gin"), [
        f'TrainerArgs.run_dir="{workdir}/{preset}"',
        "TrainerArgs.eval_interval=1000", "TrainerArgs.max_eval_iters=1",
        *(p.replace("{workdir}", workdir) for p in params),
    ], task=task, world_size=1)

    def one_step(trainer) -> str:
        feed = trainer.open_batches()
        trainer.model.train()
        batches = iter(feed)
        try:
            trainer.train_step(batches)  # warm-up: first lookups, kernel choices
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                loss = trainer.train_step(batches)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        finally:
            feed.close()
        return f"one step, no host sync; loss {float(loss.float().sum()):.4g}"

    try:
        return with_trainer(cfg, f"{workdir}/{preset}_rank0", one_step)
    except torch.cuda.OutOfMemoryError as exc:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(f"does not fit this GPU ({total:.0f} GiB): {_one_line(exc)}", file=sys.stderr)
        sys.exit(OUT_OF_MEMORY_EXIT)


def check_trainer_steps(result: CheckResult, deadline: float) -> None:
    """Steps every preset :func:`trainer_presets` selects, one process each, until the
    monotonic ``deadline``; one row per preset of configs/ (skips say why)."""
    missing = [m for m in TRAINER_NEEDS if not _module_present(m)]
    if missing:
        raise SkipPart(f"needs {', '.join(missing)} (not installed here)")
    import tempfile

    for plan_ in trainer_presets(_repo_root(), torch.cuda.device_count()):
        left = deadline - time.monotonic()
        if plan_.skip is not None or left < MIN_PRESET_S:
            why = plan_.skip or f"the time budget is spent ({left:.0f} s left)"
            result.row(plan_.preset, f"skipped: {why}", None)
            continue
        # each preset in its own process: gin, the process group and the tables start clean
        with tempfile.TemporaryDirectory(prefix="hstu-gpu-check-") as workdir:
            code = ("import sys; from hstu.gpu_check import _trainer_step_in_process as f; "
                    f"print(f({plan_.preset!r}, {plan_.task!r}, {list(plan_.params)!r}, "
                    f"{workdir!r}))")
            try:
                done = subprocess.run([sys.executable, "-c", code], cwd=_repo_root(),
                                      capture_output=True, text=True,
                                      timeout=min(PYTEST_TIMEOUT_S, left), check=False)
            except subprocess.TimeoutExpired:
                result.row(plan_.preset, f"timed out after {min(PYTEST_TIMEOUT_S, left):.0f} s",
                           False)
                continue
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit {done.returncode}"
        if done.returncode == 0:
            result.row(plan_.preset, done.stdout.strip().splitlines()[-1], True)
        elif done.returncode == OUT_OF_MEMORY_EXIT:
            result.row(plan_.preset, f"skipped: {last}", None)
        else:
            result.row(plan_.preset, last, False)
    stepped = sum(row["status"] == "pass" for row in result.rows)
    failed = [row["case"] for row in result.rows if row["status"] == "fail"]
    result.summary = (f"host sync or error in {', '.join(failed)}" if failed
                      else f"no host sync in {stepped} of {len(result.rows)} presets")


# --------------------------------------------------------------------------------- driver


def plan(only: list[str] | None = None) -> list[CheckResult]:
    """The checks to run, in order: all of them, or those named in ``only``."""
    return [
        CheckResult(name, description)
        for name, description in CHECKS.items()
        if only is None or name in only
    ]


def run_checks(
    budget_s: float, only: list[str] | None = None
) -> tuple[list[CheckResult], dict[str, Any]]:
    started = time.monotonic()
    results = plan(only)
    runners: dict[str, Callable[[CheckResult], None]] = {
        "environment": check_environment,
        "pytest_gpu": lambda r: check_pytest_gpu(
            r, max(30.0, min(PYTEST_TIMEOUT_S, budget_s - (time.monotonic() - started) - 120))
        ),
        "kernels_vs_reference": check_kernels_vs_reference,
        "kernel_throughput": check_kernel_throughput,
        "block_throughput": check_block_throughput,
        "sync_free_steps": check_sync_free_steps,
        "trainer_steps": lambda r: check_trainer_steps(r, started + budget_s),
    }
    for result in results:
        if time.monotonic() - started > budget_s:
            result.status, result.summary = "skip", f"time budget of {budget_s:.0f} s spent"
            continue
        t0 = time.monotonic()
        try:
            runners[result.name](result)
        except SkipPart as exc:
            result.status, result.summary = "skip", str(exc)
        # The checker's purpose is to report every part in one call: an error in one check is
        # recorded (status "error", exit status 1) and the next check still runs.
        except Exception as exc:  # noqa: BLE001
            result.status, result.summary = "error", _one_line(exc)
        else:
            failed = any(row["status"] == "fail" for row in result.rows)
            result.status = "fail" if failed else "pass"
        finally:
            torch.cuda.synchronize()
            result.seconds = round(time.monotonic() - t0, 1)
            print(f"{result.name}: {result.status}, {result.summary} [{result.seconds:.0f} s]",
                  flush=True)
    environment = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "optional_modules": {name: _module_present(name) for name in OPTIONAL_MODULES},
    }
    return results, environment


def format_table(results: list[CheckResult]) -> str:
    header = ("check", "case", "result", "status")
    rows: list[tuple[str, ...]] = []
    for r in results:
        summary = r.description if r.status == "planned" else f"{r.summary} [{r.seconds:.0f} s]"
        rows.append((r.name, "", summary, r.status))
        rows += [("", row["case"], row["result"], row["status"]) for row in r.rows]
    widths = [min(160, max(len(str(x[i])) for x in [header, *rows])) for i in range(4)]

    def line(values: tuple[str, ...]) -> str:
        cells = [str(v)[: widths[i]].ljust(widths[i]) if i < 3 else str(v)
                 for i, v in enumerate(values)]
        return " | ".join(cells).rstrip()

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def to_json(results: list[CheckResult], environment: dict[str, Any], dry_run: bool) -> dict:
    return {
        "schema": SCHEMA,
        "dry_run": dry_run,
        "environment": environment,
        "checks": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hstu.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None,
                        help="where to write the results (default gpu_check.json; a dry run "
                        "writes its plan only when given)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="stop starting new checks after this many seconds")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the checks and what this host lacks; run nothing")
    parser.add_argument("--only", default=None,
                        help="comma-separated check names to run (default: all)")
    args = parser.parse_args(argv)
    only = None
    if args.only is not None:
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in only if name not in CHECKS]
        if unknown or not only:
            parser.error(f"--only: unknown check {', '.join(unknown) or '(none given)'}; "
                         f"the checks are {', '.join(CHECKS)}")
    if args.dry_run:
        results = plan(only)
        environment = {
            "cuda_available": torch.cuda.is_available(),
            "torch": torch.__version__,
            "optional_modules": {name: _module_present(name) for name in OPTIONAL_MODULES},
        }
        print(format_table(results))
        files = [str(p.relative_to(_repo_root())) for p in gpu_test_files(_repo_root())]
        print(f"pytest_gpu would run: {' '.join(files) or '(no tests/ here)'}")
        num_gpus = max(1, torch.cuda.device_count())
        presets = trainer_presets(_repo_root(), num_gpus)
        print(f"trainer_steps would step (on {num_gpus} GPU, memory permitting): "
              f"{' '.join(p.preset for p in presets if p.skip is None)}")
        for p in presets:
            if p.skip is not None:
                print(f"trainer_steps would skip {p.preset}: {p.skip}")
        for name, present in environment["optional_modules"].items():
            if not present:
                print(f"absent here: {name} ({OPTIONAL_MODULES[name]})")
        written = ""
        if args.json:
            Path(args.json).write_text(json.dumps(to_json(results, environment, True), indent=2))
            written = f"; plan written to {args.json}"
        print(f"dry run: {len(results)} checks listed, nothing run{written}")
        return 0
    if not torch.cuda.is_available():
        print("hstu.gpu_check: no CUDA device here; use --dry-run to list the checks")
        return 2
    results, environment = run_checks(args.budget_s, only)
    print(format_table(results))
    path = Path(args.json or "gpu_check.json")
    path.write_text(json.dumps(to_json(results, environment, False), indent=2))
    print(f"results written to {path}")
    return 1 if any(r.status in ("fail", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
