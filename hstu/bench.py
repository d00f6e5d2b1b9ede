"""One benchmark command: ``python -m hstu.bench`` (table on stdout, JSON to ``--json``).

In one run: the machine's matmul roof in each training dtype, then per preset the training
throughput (real jagged tokens/s, samples/s), model TFLOP/s (``hstu.training.flops``), MFU
against the measured roof, peak memory per rank (max RSS) and the step split into data,
embedding lookup, forward, backward, optimizer and communication, read from a
``torch.profiler`` window over the same steps.

Each preset runs in its own process group (``torch.distributed.run``, 1 or 2 processes), so
gin state and peak memory do not leak from one preset to the next. Steps are run as the
``none`` pipeline runs them (zero_grad, forward, backward, step), one batch at a time.

    python -m hstu.bench                                   # the core presets
    python -m hstu.bench --presets ml1m_paper_on_ml100k --steps 16 --json out.json
    python -m hstu.bench --list

The ML-1M paper retrieval preset runs on ML-100K data (``tmp_data/ml-100k``, preprocessed
from ``--ml100k-raw`` when missing); the synthetic presets need nothing.

The online-training presets (not in ``all``, each run alone: ``stream``, events/s and memory
per window over a synthetic KuaiRand-1K stream; ``stream-open``, a drifting open world of new
ids; ``stream-vs-open``, the KuaiRand stream through both presets side by side) and the
long-history presets (``--presets long``: the HSTU block alone per method and history length)
are described in docs/performance.md, "Online training" and "Measuring".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from hstu.ops.losses import native_bfloat16_matmul
from hstu.training.pipeline import STEP_LABEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Preset:
    name: str
    config: str
    nproc: int = 1
    params: list[str] = field(default_factory=list)
    data: str | None = None  # preprocessed dataset the preset needs under tmp_data/
    note: str = ""
    group: str = "core"  # "core" presets run by default; "scaling" with --presets scaling
    long: tuple[str, int] | None = None  # long-history presets: (method, history length)


_ZIPF = ("item/FeatureArgs.max_sequence_length=512",)
# ML-100K over eight copies of its catalogue (see _make_wide_catalogue)
WIDE_CATALOGUE = "ml-100k-x8"
CATALOGUE_COPIES = 8

PRESETS = [
    Preset(
        "ml1m_paper_on_ml100k", "configs/ml-1m_retrieval.gin", 1,
        ['DatasetArgs.dataset_name="ml-100k"', 'NetworkArgs.kernel_backend="pytorch"'],
        data="ml-100k",
        note="the HSTU paper's ML-1M retrieval recipe (2x50, 1 head, len 200, 128 negatives, "
             "batch 128) on ML-100K",
    ),
    Preset(
        "ml1m_paper_on_ml100k_dp2", "configs/ml-1m_retrieval.gin", 2,
        ['DatasetArgs.dataset_name="ml-100k"', 'NetworkArgs.kernel_backend="pytorch"',
         "DatasetArgs.balance_ranks=True"],
        data="ml-100k",
        note="the same recipe, DP=2 on 2 processes, same per-rank batch (128), batches split "
             "by tokens",
    ),
    Preset("benchmark_ranking", "configs/benchmark_ranking.gin", 1,
           note="synthetic zipf lengths up to 128 + 16 candidates, batch 32"),
    Preset("default_demo", "configs/default_retrieval.gin", 1, data="synthetic",
           note="configs/default_retrieval.gin (the README demo), 1 process"),
    Preset("benchmark_ranking_dp2", "configs/benchmark_ranking.gin", 2,
           note="benchmark_ranking, DP=2 on 2 processes, same per-rank batch"),
    Preset("tp2_ranking", "configs/tp2_ranking.gin", 2, data="synthetic",
           note="configs/tp2_ranking.gin, TP=2 on 2 processes"),
    Preset("ranking_h256", "configs/benchmark_ranking.gin", 1,
           ["NetworkArgs.hidden_size=256", "NetworkArgs.kv_channels=128"],
           note="benchmark_ranking at hidden 256 (2 heads x 128): the MFU check"),
    Preset("zipf_jagged", "configs/benchmark_ranking.gin", 1, list(_ZIPF),
           note="benchmark_ranking, zipf lengths up to 512 (+16 candidates), jagged"),
    Preset("zipf_padded", "configs/benchmark_ranking.gin", 1,
           [*_ZIPF, 'NetworkArgs.sequence_layout="padded"'],
           note="the same batches padded to the longest allowed sequence (529 tokens)"),
    Preset("ml100k_retrieval", "configs/ml-100k_retrieval.gin", 2, data="ml-100k",
           note="configs/ml-100k_retrieval.gin (full-corpus softmax over 1,682 items), "
                "2 processes"),
    Preset("ml100k_retrieval_10k_items", "configs/ml-100k_retrieval.gin", 2,
           [f'DatasetArgs.dataset_name="{WIDE_CATALOGUE}"'], data=WIDE_CATALOGUE,
           note="the same preset on ML-100K with each user's items moved to one of 8 copies "
                "of the catalogue (10,450 distinct items, same sequences)"),
]

def _scaling_presets() -> list[Preset]:
    """Cost vs sequence length (fixed lengths, ~8k tokens per step) and vs catalogue size
    (uniform 128 negatives and the full-corpus softmax), configs/benchmark_retrieval.gin."""
    out = []
    for length in (200, 1000, 4000):
        out.append(Preset(
            f"seqlen_{length}", "configs/benchmark_retrieval.gin", 1,
            ["item/FeatureArgs.is_jagged=False", f"item/FeatureArgs.max_sequence_length={length}",
             f"TrainerArgs.train_batch_size={max(1, 8_000 // length)}",
             f"NetworkArgs.num_position_buckets={length + 8}"],
            note=f"every sample {length} items, {max(1, 8_000 // length)} samples per step",
            group="scaling"))
    for items, tag in ((1_700, "1.7k"), (10_000, "10k"), (100_000, "100k")):
        size = f"item/EmbeddingArgs.item_vocab_size_or_capacity={items}"
        out.append(Preset(f"catalogue_{tag}_uniform", "configs/benchmark_retrieval.gin", 1,
                          [size, "TrainerArgs.train_batch_size=128"],
                          note=f"{items:,} items, 128 uniform negatives, batch 128",
                          group="scaling"))
        out.append(Preset(f"catalogue_{tag}_full", "configs/benchmark_retrieval.gin", 1,
                          [size, "TrainerArgs.train_batch_size=128",
                           'RetrievalArgs.negative_sampling="full_corpus"',
                           "RetrievalArgs.num_negatives=-1"],
                          note=f"{items:,} items, full-corpus softmax, batch 128", group="scaling"))
    return out


# method -> (NetworkArgs bindings, note); "sl<alpha>" samples the kept tokens per step
LONG_TRUNCATION_LEN = 1024
LONG_METHODS: dict[str, tuple[list[str], str]] = {
    "full": ([], "full attention"),
    "window256": (["NetworkArgs.max_attn_len=256"], "semi-local attention, W = 256"),
    "window1024": (["NetworkArgs.max_attn_len=1024"], "semi-local attention, W = 1,024"),
    "sl1.5": ([], "stochastic length, alpha 1.5 (full attention on the kept tokens)"),
    "sl1.7": ([], "stochastic length, alpha 1.7 (full attention on the kept tokens)"),
    "trunc": (["NetworkArgs.attn_truncation_layers=1",
               f"NetworkArgs.attn_truncation_len={LONG_TRUNCATION_LEN}"],
              (f"attention truncation: layer 1 over the history, layers 2-4 over its last "
               f"{LONG_TRUNCATION_LEN:,} tokens")),
}
LONG_LENGTHS = {"1k": 1024, "4k": 4096, "16k": 16384, "64k": 65536}


def _long_presets() -> list[Preset]:
    return [
        Preset(f"long_{method}_{tag}", "configs/bench/long_block.gin", 1, list(params),
               note=f"{note}; one {length:,}-token history per step", group="long",
               long=(method, length))
        for method, (params, note) in LONG_METHODS.items()
        for tag, length in LONG_LENGTHS.items()
    ]


PRESETS += _scaling_presets()
PRESETS += _long_presets()
BY_NAME = {p.name: p for p in PRESETS}
GROUPS = {g: [p.name for p in PRESETS if p.group == g] for g in ("core", "scaling", "long")}

CORE_DEFAULT_STEPS = 16
LONG_DEFAULT_STEPS = 3


def _default_memory_limit_gib() -> float:
    """3/4 of MemAvailable (Linux), else 3/4 of 24 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return 0.75 * int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 18.0


PHASES = ("data", "embedding", "forward", "backward", "optimizer")
_COMM_MARKERS = ("c10d::", "gloo", "nccl", "all_reduce", "allreduce", "all_to_all", "alltoall",
                 "all_gather", "allgather", "reduce_scatter", "broadcast", "barrier")


# ------------------------------------------------------------------------------ roof


def matmul_roof(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on this process's threads."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------- worker


class _Phase:
    """record_function labels opened by a forward pre-hook and closed by the forward hook."""

    def __init__(self, name: str) -> None:
        self.name, self.stack = name, []

    def pre(self, *_args, **_kwargs):
        rf = torch.autograd.profiler.record_function(STEP_LABEL + self.name)
        rf.__enter__()
        self.stack.append(rf)

    def post(self, *_args, **_kwargs):
        if self.stack:
            self.stack.pop().__exit__(None, None, None)


def _worker(a: argparse.Namespace) -> None:
    import gin
    import torch.distributed as dist

    from hstu.config import load_config
    from hstu.training.distributed import destroy_distributed, init_distributed, set_seed
    from hstu.training.trainer import Trainer

    torch.set_num_threads(a.threads)
    preset = BY_NAME[a.worker]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = os.path.join(ROOT, preset.config)
    task = "ranking" if "ranking" in os.path.basename(config) else "retrieval"
    run_dir = tempfile.mkdtemp(prefix=f"hstu-bench-{preset.name}-")
    total = a.warmup + a.steps + a.profile_steps
    gin.clear_config()
    cfg = load_config(config, [
        *preset.params, *a.gin_param, 'TrainerArgs.pipeline_type="none"',
        f"TrainerArgs.max_train_iters={total}", f"TrainerArgs.eval_interval={10 * total}",
        "TrainerArgs.max_eval_iters=1", f"TrainerArgs.log_interval={total}",
        f'TrainerArgs.run_dir="{run_dir}"',
    ], task=task, world_size=world)
    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    set_seed(cfg.trainer.seed)
    trainer = Trainer(cfg, env, run_dir, "")
    model = trainer.model
    dtype_str = cfg.network.dtype_str
    roof = matmul_roof(getattr(torch, dtype_str))

    feed = trainer.open_batches()  # the trainer's batches and (sequential) pipeline
    batches = iter(feed)
    phase_hooks = []
    for name, module in (("embedding", model.sparse), ("forward", model.dense)):
        ph = _Phase(name)
        phase_hooks += [module.register_forward_pre_hook(ph.pre),
                        module.register_forward_hook(ph.post)]
    # real tokens per sample against the padded width the kernel is given (max_seqlen)
    shape = {"tokens": 0, "samples": 0, "width": 0}

    def block_shape(_module, args):
        offsets, max_seqlen = args[1], args[2]
        shape["tokens"] = shape["tokens"] + offsets[-1]  # stays on the device: no sync per step
        shape["samples"] += offsets.numel() - 1
        shape["width"] = max(shape["width"], int(max_seqlen))

    block = getattr(model.dense_module, "block", None)
    if block is not None:
        phase_hooks.append(block.register_forward_pre_hook(block_shape))
    model.train()

    def step():
        """The trainer's own step (profiler labels hstu::data/backward/optimizer); its cost."""
        trainer.train_step(batches)
        return feed.pop_cost()

    for _ in range(a.warmup):
        step()
    if dist.is_initialized():
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    costs = [step() for _ in range(a.steps)]
    if dist.is_initialized():
        dist.barrier()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    from torch.profiler import ProfilerActivity, profile

    split = {k: 0.0 for k in (*PHASES, "communication")}
    if a.profile_steps > 0:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.profile_steps):
                step()
        for ev in prof.key_averages():
            key = ev.key
            if key.startswith(STEP_LABEL):
                # phases, and labels inside them (e.g. the weight average's work)
                name = key[len(STEP_LABEL):]
                split[name] = split.get(name, 0.0) + ev.cpu_time_total / 1e6 / a.profile_steps
            elif any(m in key.lower() for m in _COMM_MARKERS) and not key.startswith("aten::"):
                split["communication"] += ev.self_cpu_time_total / 1e6 / a.profile_steps
        # the embedding lookup runs inside no other label; the dense forward likewise
        split["step_profiled"] = sum(split[k] for k in PHASES)
        if a.top_ops and env.rank == 0:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top_ops),
                  file=sys.stderr, flush=True)
    syncs = _audited_steps(trainer, step, a.audit_steps)
    for h in phase_hooks:
        h.remove()

    import resource

    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "tokens": sum(c.tokens for c in costs), "samples": sum(c.samples for c in costs),
        "flops": sum(c.flops for c in costs), "seconds": seconds, "cpu_seconds": cpu_seconds,
        "rss_gib": rss_gib, "roof_flops": roof, "split_s": split, "syncs": syncs,
        "fill": float(shape["tokens"]) / max(1, shape["samples"]) / max(1, shape["width"]),
    }
    gathered = [result]
    if dist.is_initialized() and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
    feed.close()
    trainer.close()
    if env.rank == 0:
        s = max(g["seconds"] for g in gathered)
        fl = sum(g["flops"] for g in gathered)
        out = {
            "preset": preset.name, "config": preset.config, "params": preset.params + a.gin_param,
            "note": preset.note, "processes": world, "threads_per_process": a.threads,
            "dtype": dtype_str, "steps": a.steps, "warmup": a.warmup,
            "tokens_per_s": sum(g["tokens"] for g in gathered) / s,
            "samples_per_s": sum(g["samples"] for g in gathered) / s,
            "step_ms": s / a.steps * 1e3,
            # process CPU time of the busiest rank per step (all its threads): steadier than
            # wall time on a shared host
            "cpu_ms_per_step": max(g["cpu_seconds"] for g in gathered) / a.steps * 1e3,
            "tflops": fl / s / 1e12,
            "roof_tflops_per_process": min(g["roof_flops"] for g in gathered) / 1e12,
            "mfu": fl / s / sum(g["roof_flops"] for g in gathered),
            "peak_rss_gib_per_rank": [round(g["rss_gib"], 3) for g in gathered],
            "split_ms": {k: round(v * 1e3, 2) for k, v in gathered[0]["split_s"].items()},
            "mean_over_max_tokens": round(gathered[0]["fill"], 4),
            # per step, the rank with the most; "first": where the first unnamed one was
            "unnamed_syncs_per_step": max(g["syncs"]["unnamed"] for g in gathered),
            "named_syncs_per_step": max(g["syncs"]["named"] for g in gathered),
            "first_unnamed_sync": next((g["syncs"]["first"] for g in gathered
                                        if g["syncs"]["first"]), ""),
        }
        with open(a.result, "w") as f:
            json.dump(out, f)
    destroy_distributed()


def _audited_steps(trainer, step, steps: int) -> dict:
    """``steps`` more trainer steps under :func:`hstu.sync_audit.sync_audit` (recording, not
    raising): the host syncs per step a CUDA run would make, unnamed (none should be) and
    named (``allowed_sync``, each with its reason; the dense optimizer's step counts too)."""
    from hstu.sync_audit import TORCH_OPTIM_STEP, allowed_sync, sync_audit

    if steps <= 0:
        return {"unnamed": float("nan"), "named": float("nan"), "first": ""}
    dense_step = trainer.optimizer.dense.step

    def named_step(*args, **kwargs):
        with allowed_sync(TORCH_OPTIM_STEP):
            return dense_step(*args, **kwargs)

    trainer.optimizer.dense.step = named_step
    try:
        with sync_audit(raise_on_sync=False) as audit:
            for _ in range(steps):
                step()
    finally:
        trainer.optimizer.dense.step = dense_step
    unnamed = audit.offending
    return {"unnamed": len(unnamed) / steps, "named": len(audit.allowed) / steps,
            "first": f"{unnamed[0].op} at {unnamed[0].where}" if unnamed else ""}


# ------------------------------------------------------------------ long histories


def stochastic_length_alpha(method: str) -> float | None:
    """alpha of an "sl<alpha>" method, else None."""
    return float(method[2:]) if method.startswith("sl") else None


def long_step_flops(method: str, length: int, network_layers: int = 4, heads: int = 2,
                    head_dim: int = 32) -> float:
    """A rough FLOP count of one forward + backward (3x the forward's Q K^T and A V) of the
    long-history block, to skip what cannot finish: every row against the keys the kernel
    computes (full: the whole sample; window W: ~2W; truncation: T above layer 1)."""
    alpha = stochastic_length_alpha(method)
    if alpha is not None:
        length = min(length, math.ceil(length ** (alpha / 2)))  # what SL keeps mostly
    per_row = 4 * heads * head_dim
    if method.startswith("window"):
        keys = [min(length, 2 * int(method[len("window"):]))] * network_layers
        rows = [length] * network_layers
    elif method == "trunc":
        kept = min(length, LONG_TRUNCATION_LEN)
        keys = rows = [length] + [kept] * (network_layers - 1)
    else:
        keys = rows = [length] * network_layers
    return 3.0 * per_row * sum(r * k for r, k in zip(rows, keys))


def _is_out_of_memory(exc: BaseException) -> bool:
    """The CPU allocator's refusal (under the worker's address-space limit) or CUDA's."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "not enough memory" in text


def _long_worker(a: argparse.Namespace) -> None:
    """One long-history preset in this process: the block of the preset's gin, ``a.steps``
    timed steps of forward + backward on one synthetic history, after ``a.warmup``."""
    import resource

    import gin
    import numpy as np

    from hstu.args import NetworkArgs
    from hstu.gin_parsing import instantiate, parse_sources
    from hstu.model.builder import build_block

    preset = BY_NAME[a.worker]
    assert preset.long is not None
    method, length = preset.long
    limit = int(a.memory_limit_gib * 2**30)
    # a preset that does not fit fails its allocation here instead of waking the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = os.path.join(ROOT, preset.config)
    gin.clear_config()
    bindings = parse_sources([config], [*preset.params, *a.gin_param], (NetworkArgs,))
    network = instantiate(NetworkArgs, "", bindings, config)
    block = build_block(network, length)
    block.train()
    alpha = stochastic_length_alpha(method)
    sl = None
    if alpha is not None:
        from hstu.data.stochastic_length import StochasticLength

        sl = StochasticLength(alpha, length, "recency", 0.0)

    def step(index: int) -> int:
        n = length if sl is None else len(
            sl.keep(np.array([length]), seed=0, epoch=0, sample_ids=np.array([index]))[0])
        x = torch.randn(n, network.hidden_size, requires_grad=True)
        offsets = torch.tensor([0, n])
        block.zero_grad(set_to_none=True)
        out = block(x, offsets, length)
        out.float().pow(2).mean().backward()
        return n

    base_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result: dict = {"preset": preset.name, "method": method, "length": length,
                    "note": preset.note, "threads_per_process": a.threads, "steps": a.steps,
                    "memory_limit_gib": round(a.memory_limit_gib, 1)}
    try:
        for i in range(a.warmup):
            step(-1 - i)
        t0 = time.perf_counter()
        tokens = [step(i) for i in range(a.steps)]
        seconds = time.perf_counter() - t0
    except (RuntimeError, MemoryError) as exc:
        if not _is_out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0][:200]
        result["skipped"] = (f"does not fit the {a.memory_limit_gib:.1f} GiB limit "
                             f"(--memory-limit-gib): {first}")
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result.update(step_s=seconds / a.steps, mean_tokens=sum(tokens) / len(tokens),
                      base_rss_gib=round(base_gib, 3), peak_rss_gib=round(peak_gib, 3),
                      step_memory_gib=round(peak_gib - base_gib, 3))
    with open(a.result, "w") as f:
        json.dump(result, f)


def _run_long(p: Preset, a: argparse.Namespace, roof_flops: float) -> dict:
    assert p.long is not None
    method, length = p.long
    if stochastic_length_alpha(method) is not None and importlib.util.find_spec(
            "hstu.data.stochastic_length") is None:
        return {"preset": p.name, "skipped": "needs stochastic length "
                "(hstu.data.stochastic_length is not in this checkout)"}
    steps = a.steps if a.steps is not None else LONG_DEFAULT_STEPS
    warmup = a.warmup if a.warmup is not None else 1
    estimate_s = long_step_flops(method, length) / roof_flops
    if estimate_s * (steps + warmup) > a.long_timeout:
        return {"preset": p.name, "skipped": f"needs ~{estimate_s:,.0f} s per step (FLOP estimate "
                f"at the matmul roof), over --long-timeout {a.long_timeout:.0f} s"}
    return _run_worker(p, a, [], a.threads or (os.cpu_count() or 1),
                       ["--steps", str(steps), "--warmup", str(warmup),
                        "--memory-limit-gib", str(a.memory_limit_gib)], timeout=a.long_timeout)


def _long_table(results: list[dict]) -> str:
    """Step time and memory per long-history preset, then per method the cost of 4x the
    history (4k -> 16k): time and step memory (peak RSS over the process before the step)."""
    head = (f"{'preset':24s} {'tokens':>8s} {'step s':>9s} {'peak RSS GiB':>12s} "
            f"{'step mem GiB':>12s}  method")
    lines = [head, "-" * len(head)]
    by_name = {}
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['preset']:24s} "
                         + (f"skipped: {r['skipped']}" if "skipped" in r
                            else "ERROR: " + r["error"].strip().splitlines()[-1]))
            continue
        by_name[r["preset"]] = r
        lines.append(f"{r['preset']:24s} {r['mean_tokens']:8,.0f} {r['step_s']:9.3f} "
                     f"{r['peak_rss_gib']:12.2f} {r['step_memory_gib']:12.2f}  {r['note']}")
    ratios = []
    for method in LONG_METHODS:
        short, long_ = by_name.get(f"long_{method}_4k"), by_name.get(f"long_{method}_16k")
        if short and long_:
            mem = (long_["step_memory_gib"] / short["step_memory_gib"]
                   if short["step_memory_gib"] > 0 else float("nan"))
            ratios.append(f"  {method:12s} time x{long_['step_s'] / short['step_s']:.2f}, "
                          f"step memory x{mem:.2f}")
    if ratios:
        lines += ["", "4k -> 16k history:", *ratios]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- driver


def _make_wide_catalogue(raw: str, out_csv: str, copies: int) -> None:
    """ML-100K ratings with user u's items moved to copy (u mod ``copies``) of the catalogue:
    the same sequences (lengths, order, times) over ``copies`` x 1,682 items."""
    src = os.path.join(raw, "u.data")
    with open(src) as f, open(out_csv, "w") as g:
        g.write("user,item,rating,timestamp\n")
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) != 4:
                raise ValueError(
                    f"{src}:{line_no}: expected 4 tab-separated fields, got {len(parts)}")
            user, item, rating, ts = (int(x) for x in parts)
            g.write(f"{user},{item + 1682 * (user % copies)},{rating},{ts}\n")


def _ensure_data(name: str, raw: str | None) -> str | None:
    """None when tmp_data/<name> is ready, else why the preset is skipped."""
    if os.path.exists(os.path.join(ROOT, "tmp_data", name, "metadata.json")):
        return None
    out = os.path.join(ROOT, "tmp_data")
    cmd = [sys.executable, "-m", "hstu.data.preprocess", "--out", out, "--quiet"]
    if name == WIDE_CATALOGUE:
        if not raw or not os.path.exists(os.path.join(raw, "u.data")):
            return f"no raw ML-100K at {raw!r} (--ml100k-raw) to build {name}"
        os.makedirs(out, exist_ok=True)
        csv = os.path.join(out, f"{name}.csv")
        _make_wide_catalogue(raw, csv, CATALOGUE_COPIES)
        cmd += ["--dataset", "custom", "--raw", csv, "--name", name]
        for field, column in (("user", "user"), ("item", "item"), ("timestamp", "timestamp"),
                              ("action", "rating")):
            cmd += ["--gin-param", f'CustomDataArgs.{field}_column="{column}"']
    else:
        cmd += ["--dataset", name]
        if name != "synthetic":
            if not raw or not os.path.exists(raw):
                return f"no tmp_data/{name} and no raw data at {raw!r} (--ml100k-raw)"
            cmd += ["--raw", raw]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True)
    return None if done.returncode == 0 else f"preprocess {name} failed: {done.stderr[-300:]}"


def _gin_args(a: argparse.Namespace) -> list[str]:
    return [arg for g in a.gin_param for arg in ("--gin-param", g)]


def _run_worker(p: Preset, a: argparse.Namespace, launcher: list[str], threads: int,
                args: list[str], timeout: float | None = None, echo: bool = False) -> dict:
    """Runs ``python [launcher] -m hstu.bench --worker <preset> args``; returns what it wrote
    to its result file (removed after), or its error. ``echo``: its stderr to ours."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, *launcher, "-m", "hstu.bench", "--worker", p.name, "--result", result,
           "--threads", str(threads), *args, *_gin_args(a)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    try:
        done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if echo:
            print(done.stderr[-20000:], file=sys.stderr)
        if done.returncode != 0 or os.path.getsize(result) == 0:
            return {"preset": p.name, "error": (done.stderr or done.stdout)[-1500:]}
        with open(result) as f:
            return json.load(f)
    except subprocess.TimeoutExpired:
        return {"preset": p.name, "skipped": f"over --long-timeout {timeout:.0f} s"}
    finally:
        os.unlink(result)


def _run_preset(p: Preset, a: argparse.Namespace) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p.nproc}"]
    steps = CORE_DEFAULT_STEPS if a.steps is None else a.steps
    warmup = 3 if a.warmup is None else a.warmup
    return _run_worker(p, a, launcher, a.threads or max(1, (os.cpu_count() or 1) // p.nproc),
                       ["--steps", str(steps), "--warmup", str(warmup),
                        "--profile-steps", str(a.profile_steps),
                        "--audit-steps", str(a.audit_steps), "--top-ops", str(a.top_ops)],
                       echo=bool(a.top_ops))


STREAM_RAW = os.path.join(ROOT, "tmp_data", "stream-bench", "kuairand-1k-raw")
STREAM_BASE = "stream-bench-kuairand"  # tmp_data/<this>: configs/bench/stream_ranking.gin's dataset


def _stream_folder(events: int, window: int) -> tuple[str, dict]:
    """The stream folder of the first ``events`` events (by time, ties in file order) of the
    synthetic KuaiRand-1K log, ``window`` events per partition; built once, then reused."""
    folder = os.path.join(ROOT, "tmp_data", "stream-bench", f"kuairand-1k-{events}-by-{window}")
    info_path = os.path.join(folder, "_bench.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return folder, json.load(f)
    if not os.path.exists(STREAM_RAW):
        print(f"[bench] stream: writing a synthetic KuaiRand-1K raw log into {STREAM_RAW}",
              flush=True)
        subprocess.run([sys.executable, "-m", "hstu.data.synthesize", "--dataset", "kuairand-1k",
                        "--out", STREAM_RAW], check=True, cwd=ROOT)
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hstu.data.stream.replay import events_of_dataset

    log = events_of_dataset("kuairand-1k", STREAM_RAW)
    order = np.argsort(log.timestamp, kind="stable")[:events]
    staging = folder + ".staging"
    os.makedirs(staging, exist_ok=True)
    for k, lo in enumerate(range(0, len(order), window)):
        rows = order[lo : lo + window]
        part = os.path.join(staging, f"part-{k:06d}")
        os.makedirs(part, exist_ok=True)
        pq.write_table(pa.table({
            "user_id": log.user[rows].astype(np.int64), "item_id": log.item[rows].astype(np.int64),
            "timestamp": log.timestamp[rows], "rating": log.rating[rows],
        }), os.path.join(part, "part-0.parquet"))
        open(os.path.join(part, "_SUCCESS"), "w").close()
    info = {"events": len(order), "distinct_items": len(np.unique(log.item[order])),
            "distinct_users": len(np.unique(log.user[order])), "window": window}
    with open(os.path.join(staging, "_bench.json"), "w") as f:
        json.dump(info, f)
    os.replace(staging, folder)
    return folder, info


def _stream_run(a: argparse.Namespace, config: str, folder: str):
    """One 2-process ranking run of configs/bench/``config`` over the stream ``folder``:
    (run folder, threads a rank, the finished process, wall seconds, its CPU seconds)."""
    run_dir = tempfile.mkdtemp(prefix="hstu-bench-stream-")
    threads = a.threads or max(1, (os.cpu_count() or 1) // 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "pretrain_gr_ranking.py"), "--gin-config-file",
           os.path.join(ROOT, "configs", "bench", config),
           "--gin-param", f'StreamArgs.path="{folder}"',
           "--gin-param", f'TrainerArgs.run_dir="{run_dir}"', *_gin_args(a)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    started = time.perf_counter()
    cpu0 = os.times()
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    cpu1 = os.times()
    cpu_s = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system
                                                         - cpu0.children_system)
    # the run's checkpoints (hundreds of MiB to GiBs) are measured by then: removed; its
    # metrics.csv and logs stay in run_dir (printed in the JSON)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return run_dir, threads, done, time.perf_counter() - started, cpu_s


def _run_stream(a: argparse.Namespace) -> dict:
    """The online-training benchmark (docs/performance.md): one 2-process run over the stream."""
    base = os.path.join(ROOT, "tmp_data", STREAM_BASE)
    if not os.path.exists(os.path.join(base, "metadata.json")):
        # the base dataset only names the features and says the actions are KuaiRand's bitmask
        raw = os.path.join(ROOT, "tmp_data", "stream-bench", "base-raw")
        for cmd in (["hstu.data.synthesize", "--dataset", "kuairand-1k", "--fraction", "0.001",
                     "--out", raw],
                    ["hstu.data.preprocess", "--dataset", "kuairand-1k", "--raw", raw,
                     "--name", STREAM_BASE, "--out", os.path.join(ROOT, "tmp_data"), "--quiet"]):
            done = subprocess.run([sys.executable, "-m", *cmd], check=False, cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                return {"preset": "stream", "error": f"{cmd[0]} failed: {done.stderr[-500:]}"}
    folder, info = _stream_folder(a.stream_events, a.stream_window)
    run_dir, threads, done, wall, cpu_s = _stream_run(a, "stream_ranking.gin", folder)
    if done.returncode != 0:
        return {"preset": "stream", "error": (done.stderr or done.stdout)[-1500:]}
    from hstu.training.report import stream_windows

    ws = stream_windows(run_dir)
    rows = re.search(r"dynamic table item: (\d+) rows", done.stdout + done.stderr)
    rss = {r: [w[f"rss_mib_rank{r}"] for w in ws] for r in range(2)}
    auc = [w["AUC"] for w in ws if "AUC" in w]
    return {
        "preset": "stream", **info, **_window_figures(ws), "wall_s": wall, "cpu_s": cpu_s,
        "train_steps": sum(w["train_steps"] for w in ws),
        "known_items": ws[-1]["known_items"] if ws else 0,
        "capacity": int(rows.group(1)) if rows else 0,
        "evicted": ws[-1].get("item_evicted", 0.0) if ws else 0.0,
        "rss_mib": {r: {"first": v[0], "median": float(sorted(v)[len(v) // 2]), "last": v[-1],
                        "peak": max(v)} for r, v in rss.items()},
        "auc_first": auc[0] if auc else None, "auc_last": auc[-1] if auc else None,
        "threads": threads, "run_dir": run_dir,
    }


def open_stream_folder(events: int, items: int, users: int, window: int, seed: int = 0,
                       root: str | None = None) -> tuple[str, dict]:
    """A synthetic stream with a drifting catalogue and population: ``events`` events in
    partitions of ``window``, about ``items`` distinct items and ``users`` distinct users over
    the stream (at any time a window of active items and users, popular ones drawn more, that
    slides along the ids), one event every 0.5 s of event time on average, click labels (0/1)
    as the rating; built once, then reused."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = root or os.path.join(ROOT, "tmp_data", "stream-bench")
    folder = os.path.join(root, f"open-{events}-{items}-{users}-by-{window}")
    info_path = os.path.join(folder, "_bench.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            return folder, json.load(f)
    rng = np.random.default_rng(seed)
    parts = -(-events // window)
    active_items, active_users = max(1, items // 8), max(1, users // 4)
    staging = folder + ".staging"
    os.makedirs(staging, exist_ok=True)
    t = 1_700_000_000
    for k in range(parts):
        n = min(window, events - k * window)
        item_base = (items - active_items) * k // max(parts - 1, 1)
        user_base = (users - active_users) * k // max(parts - 1, 1)
        item = item_base + (active_items * rng.random(n) ** 3).astype(np.int64)
        user = user_base + (active_users * rng.random(n) ** 2).astype(np.int64)
        times = t + np.cumsum(rng.integers(0, 2, n))
        t = int(times[-1]) + 1
        part = os.path.join(staging, f"part-{k:06d}")
        os.makedirs(part, exist_ok=True)
        pq.write_table(pa.table({"user_id": user, "item_id": item, "timestamp": times,
                                 "rating": (rng.random(n) < 0.3).astype(np.int64)}),
                       os.path.join(part, "part-0.parquet"))
        open(os.path.join(part, "_SUCCESS"), "w").close()
    info = {"events": events, "items": items, "users": users, "window": window}
    with open(os.path.join(staging, "_bench.json"), "w") as f:
        json.dump(info, f)
    os.replace(staging, folder)
    return folder, info


def _window_tokens(ws: list[dict]) -> float:
    """The sequence items the windows tested and trained (their ``tested_tokens`` and
    ``trained_tokens`` rows): what a window's cost follows."""
    return sum(w.get("trained_tokens", 0.0) + w.get("tested_tokens", 0.0) for w in ws)


def _window_figures(ws: list[dict]) -> dict:
    """A run's stream windows summed: windows, events, seconds in the windows, events/s,
    tokens/s and sequence items an event."""
    events = sum(w["events"] for w in ws)
    loop_s = sum(w["window_seconds"] for w in ws)
    tokens = _window_tokens(ws)
    return {"windows": len(ws), "events_streamed": events, "events_per_s": events / loop_s,
            "loop_s": loop_s, "tokens_per_s": tokens / loop_s,
            "tokens_per_event": tokens / max(events, 1)}


def _run_open_stream(a: argparse.Namespace) -> dict:
    """The open-world online benchmark: 2 processes over a drifting synthetic stream with
    configs/bench/stream_open_ranking.gin (hashed ids, bounded tables and stores)."""
    folder, info = open_stream_folder(a.stream_events, a.stream_items, a.stream_users,
                                      a.stream_window)
    run_dir, threads, done, wall, _ = _stream_run(a, "stream_open_ranking.gin", folder)
    if done.returncode != 0:
        return {"preset": "stream-open", "error": (done.stderr or done.stdout)[-1500:]}
    from hstu.training.report import stream_windows

    ws = stream_windows(run_dir)
    full = next((i for i, w in enumerate(ws) if w.get("item_occupied", 0) >= a.stream_capacity),
                None)
    half = ws[len(ws) // 2:]
    rss = {}
    for r in range(2):
        v = [w[f"rss_mib_rank{r}"] for w in ws]
        second = [w[f"rss_mib_rank{r}"] for w in half]
        rss[r] = {"first": v[0], "median": float(sorted(v)[len(v) // 2]), "last": v[-1],
                  "peak": max(v), "second_half_growth": (second[-1] - second[0]) / second[0]}
    ckpt = [(w["checkpoint_bytes"], w.get("checkpoint_full", 1.0),
             w.get("checkpoint_table_bytes"), w.get("checkpoint_rows_item"))
            for w in ws if "checkpoint_bytes" in w]
    return {
        "preset": "stream-open", **info, **_window_figures(ws), "wall_s": wall,
        "table_full_at_window": None if full is None else full + 1,
        "occupied_last": ws[-1].get("item_occupied", 0.0) if ws else 0.0,
        "evicted": ws[-1].get("item_evicted", 0.0) if ws else 0.0,
        "expired_item_rows": sum(w.get("expired_item_rows", 0.0) for w in ws),
        "expired_users": sum(w.get("expired_users", 0.0) for w in ws),
        "rss_mib": rss, "checkpoints": ckpt, "threads": threads, "run_dir": run_dir,
    }


def _clicks_folder(folder: str) -> str:
    """``folder`` (a KuaiRand stream, rating = the action bitmask) with rating = its bit 0
    (is_click) as 0 / 1: the label configs/bench/stream_ranking.gin reads from the bitmask, in
    the form the open preset reads (``StreamArgs.rating_classes = 2``); built once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = folder + "-clicks"
    if os.path.exists(os.path.join(out, "_bench.json")):
        return out
    staging = out + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    for part in sorted(os.listdir(folder)):
        src = os.path.join(folder, part)
        if not os.path.isdir(src):
            continue
        os.makedirs(os.path.join(staging, part))
        for name in sorted(os.listdir(src)):
            if name.endswith(".parquet"):
                t = pq.read_table(os.path.join(src, name))
                bits = t.column("rating").to_numpy().astype(np.int64) & 1
                t = t.set_column(t.schema.get_field_index("rating"), "rating", pa.array(bits))
                pq.write_table(t, os.path.join(staging, part, name))
            else:
                shutil.copy(os.path.join(src, name), os.path.join(staging, part, name))
    shutil.copy(os.path.join(folder, "_bench.json"), os.path.join(staging, "_bench.json"))
    os.replace(staging, out)
    return out


def _run_stream_vs_open(a: argparse.Namespace) -> dict:
    """The open world's cost on one stream: the KuaiRand stream of ``stream`` through its preset
    (dense ids, id maps, no expiry), then the same events through the open preset
    (configs/bench/stream_open_ranking.gin: hashed ids, expiry, bounded user store) with the
    same item-table rows, side by side in one run."""
    closed = _run_stream(a)
    if "error" in closed:
        return {"preset": "stream-vs-open", "error": "stream: " + closed["error"]}
    folder, _ = _stream_folder(a.stream_events, a.stream_window)
    cap = closed["capacity"] or 262_144
    b = argparse.Namespace(**vars(a))
    b.gin_param = [*a.gin_param, f"item/DynamicEmbeddingArgs.item_vocab_size_or_capacity={cap}",
                   f"StreamArgs.item_capacity={cap}"]
    run_dir, threads, done, wall, cpu_s = _stream_run(b, "stream_open_ranking.gin",
                                                      _clicks_folder(folder))
    if done.returncode != 0:
        return {"preset": "stream-vs-open", "error": (done.stderr or done.stdout)[-1500:]}
    from hstu.training.report import stream_windows

    ws = stream_windows(run_dir)
    auc = [w["AUC"] for w in ws if "AUC" in w]
    opened = {**_window_figures(ws), "wall_s": wall, "cpu_s": cpu_s,
              "train_steps": sum(w["train_steps"] for w in ws),
              "evicted": ws[-1].get("item_evicted", 0.0) if ws else 0.0,
              "expired_item_rows": sum(w.get("expired_item_rows", 0.0) for w in ws),
              "auc_last": auc[-1] if auc else None, "run_dir": run_dir}
    return {"preset": "stream-vs-open", "capacity": cap, "threads": threads, "closed": closed,
            "open": opened, "ratio": opened["events_per_s"] / closed["events_per_s"]}


def _stream_vs_open_table(r: dict) -> str:
    if "error" in r:
        return f"stream-vs-open: {r['error']}"
    c, o = r["closed"], r["open"]
    return "\n".join([
        (f"the open world's cost on one stream ({c['events_streamed']:,.0f} events of a synthetic "
         f"KuaiRand-1K log, {r['capacity']:,}-row item table, 2 processes, {r['threads']} "
         "threads each; side by side):"),
        ("  | preset | events/s | tokens/s | sequence items an event | train steps | "
         "seconds in the windows | last window's AUC |"),
        "  |---|---|---|---|---|---|---|",
        *(f"  | {name} | {x['events_per_s']:,.0f} | {x['tokens_per_s']:,.0f} | "
          f"{x['tokens_per_event']:.1f} | {x['train_steps']:,.0f} | {x['loop_s']:.0f} | "
          f"{x['auc_last'] if x['auc_last'] is None else round(x['auc_last'], 4)} |"
          for name, x in (("stream (dense ids, id maps)", c),
                          ("stream-open (hashed ids, expiry, bounded users)", o))),
        (f"  open / closed: {r['ratio']:.3f}x events/s ({o['expired_item_rows']:,.0f} item rows "
         f"expired, {o['evicted']:,.0f} evicted in the open run)"),
    ])


def _open_stream_table(r: dict) -> str:
    if "error" in r:
        return f"stream-open: {r['error']}"
    lines = [
        (f"open-world online training (configs/bench/stream_open_ranking.gin, 2 processes, "
         f"{r['threads']} threads each): {r['events_streamed']:,.0f} events, about "
         f"{r['items']:,} items and {r['users']:,} users drifting, {r['windows']} windows of "
         f"{r['window']:,}"),
        (f"  {r['events_per_s']:,.0f} events/s, {r['tokens_per_s']:,.0f} tokens/s "
         f"({r['tokens_per_event']:.1f} sequence items tested and trained an event; "
         f"{r['loop_s']:.0f} s in the windows, "
         f"{r['wall_s']:.0f} s wall); item table full at window {r['table_full_at_window']}, "
         f"{r['occupied_last']:,.0f} rows occupied at the end; {r['evicted']:,.0f} evicted, "
         f"{r['expired_item_rows']:,.0f} rows expired, {r['expired_users']:,.0f} users expired"),
        "  | rank | RSS MiB first window | median | last | peak | growth over the second half |",
        "  |---|---|---|---|---|---|",
    ]
    for rank, m in r["rss_mib"].items():
        lines.append(f"  | {rank} | {m['first']:.0f} | {m['median']:.0f} | {m['last']:.0f} | "
                     f"{m['peak']:.0f} | {m['second_half_growth']:+.1%} |")
    if r["checkpoints"]:
        lines.append("  checkpoint MiB (f: full base, d: delta): " + ", ".join(
            f"{b / 2**20:.1f}{'f' if full else 'd'}" for b, full, _, _ in r["checkpoints"]))
        rows = [(tb, n) for _, full, tb, n in r["checkpoints"] if not full and n is not None]
        if rows:
            lines.append("  deltas, item rows written -> table MiB: " + ", ".join(
                f"{n:,.0f} -> {(tb or 0) / 2**20:.1f}" for tb, n in rows))
    return "\n".join(lines)


def _stream_table(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"stream: {r.get('skipped') or r.get('error')}"
    lines = [
        (f"online training (configs/bench/stream_ranking.gin, 2 processes, "
         f"{r['threads']} threads each): {r['events_streamed']:,.0f} events of a synthetic "
         f"KuaiRand-1K log ({r['distinct_users']:,} users, {r['distinct_items']:,} distinct "
         f"items; item table {r['capacity']:,} rows, LRU) in {r['windows']} windows of "
         f"{r['window']:,}"),
        (f"  {r['events_per_s']:,.0f} events/s, {r['tokens_per_s']:,.0f} tokens/s "
         f"({r['tokens_per_event']:.1f} sequence items tested and trained an event)"),
        (f"  (test then train, {r['loop_s']:.0f} s in the "
         f"windows; {r['wall_s']:.0f} s wall with start-up, {r['cpu_s']:.0f} CPU s), "
         f"{r['train_steps']:.0f} steps; {r['evicted']:,.0f} ids evicted; AUC first window "
         f"{r['auc_first']:.4f}, last {r['auc_last']:.4f} (random data: cost only)"),
        "  | rank | RSS MiB first window | median | last | peak |",
        "  |---|---|---|---|---|",
    ]
    for rank, m in r["rss_mib"].items():
        lines.append(f"  | {rank} | {m['first']:.0f} | {m['median']:.0f} | {m['last']:.0f} "
                     f"| {m['peak']:.0f} |")
    return "\n".join(lines)


def cpu_description() -> str:
    """This host's CPU as every figure should name it: model, torch's CPU capability and
    whether it multiplies bfloat16 natively (what "auto" matmul dtypes decide on)."""
    native, why = native_bfloat16_matmul(torch.device("cpu"))
    return f"{why} -> bfloat16 matmuls {'native' if native else 'emulated'}"


def _table(roofs: dict, results: list[dict]) -> str:
    lines = [f"CPU: {cpu_description()}",
             f"matmul roof (1024^3, {torch.get_num_threads()} threads, "
             + ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in roofs.items()) + ")", ""]
    head = (f"{'preset':24s} {'proc':>4s} {'thr':>3s} {'tokens/s':>10s} {'samples/s':>10s} "
            f"{'step ms':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'RSS GiB':>9s} {'fill':>5s} "
            f"{'syncs':>11s} | split ms: "
            + " ".join(f"{k[:5]:>6s}" for k in (*PHASES, "communication")))
    lines += [head, "-" * len(head)]
    # fill: mean real tokens per sample / the padded width the kernel is given
    for r in results:
        if "error" in r or "skipped" in r:
            why = r.get("skipped") or "ERROR: " + r["error"].splitlines()[-1]
            lines.append(f"{r['preset']:24s} {why}")
            continue
        sp = r["split_ms"]
        lines.append(
            f"{r['preset']:24s} {r['processes']:4d} {r['threads_per_process']:3d} "
            f"{r['tokens_per_s']:10,.0f} {r['samples_per_s']:10,.1f} {r['step_ms']:8.1f} "
            f"{r['tflops']:8.4f} "
            f"{r['mfu']:6.1%} {max(r['peak_rss_gib_per_rank']):9.2f} "
            f"{r.get('mean_over_max_tokens', 0.0):5.2f} "
            f"{_syncs_cell(r):>11s} | split ms: "
            + " ".join(f"{sp.get(k, 0.0):6.1f}" for k in (*PHASES, "communication")))
    lines += ["", ("syncs: unnamed/named host syncs per step under hstu.sync_audit "
                   "(unnamed ones must be 0)")]
    # one line per preset whose steps made unnamed host syncs: the first one's op and line
    lines += [f"  {r['preset']}: unnamed host sync {r['first_unnamed_sync']}" for r in results
              if r.get("first_unnamed_sync")]
    return "\n".join(lines)


def _syncs_cell(r: dict) -> str:
    """"unnamed/named" host syncs per step (the audit's counts, rank with the most)."""
    unnamed, named = r.get("unnamed_syncs_per_step"), r.get("named_syncs_per_step")
    if unnamed is None or math.isnan(unnamed):  # not audited
        return "-"
    return f"{unnamed:g}/{named:g}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m hstu.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=["core"],
                    help="preset names, or a group: core (default), scaling, long, all; or "
                         "stream / stream-open / stream-vs-open (the online-training benchmarks, "
                         "alone)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed steps per preset (default {CORE_DEFAULT_STEPS}; long-history "
                         f"presets {LONG_DEFAULT_STEPS})")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default 3; long-history presets 1)")
    ap.add_argument("--long-timeout", type=float, default=600.0,
                    help="seconds a long-history preset may take (a longer one is skipped)")
    ap.add_argument("--memory-limit-gib", type=float, default=_default_memory_limit_gib(),
                    help="address-space limit of a long-history preset's process (default: "
                         "3/4 of the memory available at the start)")
    ap.add_argument("--profile-steps", type=int, default=4, help="steps under the profiler (split)")
    ap.add_argument("--audit-steps", type=int, default=2,
                    help="steps under hstu.sync_audit (the syncs columns; 0: not audited)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per process (0: cores / processes, as a plain torchrun "
                         "run)")
    ap.add_argument("--gin-param", action="append", default=[], help="added to every preset")
    ap.add_argument("--top-ops", type=int, default=0,
                    help="print the profiler's N most expensive operators (self CPU) per preset")
    ap.add_argument("--ml100k-raw", default=os.path.join(ROOT, "..", "shared", "data", "ml-100k"))
    ap.add_argument("--json", default=os.path.join(ROOT, "tmp_data", "bench.json"))
    ap.add_argument("--stream-events", type=int, default=5_000_000,
                    help="--presets stream, stream-vs-open: events of the stream (default 5M)")
    ap.add_argument("--stream-window", type=int, default=50_000,
                    help="--presets stream: events per partition (= window)")
    ap.add_argument("--stream-items", type=int, default=8_000_000,
                    help="--presets stream-open: distinct items over the stream (default 8M)")
    ap.add_argument("--stream-users", type=int, default=2_000_000,
                    help="--presets stream-open: distinct users over the stream (default 2M)")
    ap.add_argument("--stream-capacity", type=int, default=1_048_576,
                    help="--presets stream-open: the item table's rows (the preset's)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:  # started by _run_worker, with --steps and --warmup
        (_long_worker if BY_NAME[a.worker].long is not None else _worker)(a)
        return
    if a.list:
        for p in PRESETS:
            print(f"{p.name:26s} [{p.group}] {p.nproc} proc  {p.config} {' '.join(p.params)}"
                  f"  # {p.note}")
        return
    # the online-training benchmarks: each alone (a run of many minutes, the machine its own)
    alone = {"stream-vs-open": (_run_stream_vs_open, _stream_vs_open_table),
             "stream-open": (_run_open_stream, _open_stream_table),
             "stream": (_run_stream, _stream_table)}
    online = [n for n in alone if n in a.presets]
    if online:
        name = online[0]
        if set(a.presets) != {name}:
            ap.error(f"--presets {name} runs alone (its own run of many minutes)")
        if name == "stream-open" and a.stream_capacity != 1_048_576:
            cap = a.stream_capacity
            a.gin_param += [f"item/DynamicEmbeddingArgs.item_vocab_size_or_capacity={cap}",
                            f"StreamArgs.item_capacity={cap}"]
        run, table = alone[name]
        r = run(a)
        print(table(r))
        _write_json(a.json, {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                             "torch": torch.__version__, "cpu": cpu_description(), name: r})
        return
    names = [m for n in a.presets for m in (list(BY_NAME) if n == "all" else GROUPS.get(n, [n]))]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown presets {unknown}; --list shows them")
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    roofs = {"float32": matmul_roof(torch.float32), "bfloat16": matmul_roof(torch.bfloat16)}
    results, long_results = [], []
    for name in names:
        p = BY_NAME[name]
        if p.long is not None:
            r = _run_long(p, a, roofs["float32"])
            long_results.append(r)
        else:
            why = _ensure_data(p.data, a.ml100k_raw) if p.data else None
            r = {"preset": name, "skipped": why} if why else _run_preset(p, a)
            results.append(r)
        print(f"[bench] {name}: " + ("skipped: " + r["skipped"] if "skipped" in r else
              "error" if "error" in r else f"{r['step_s']:.3f} s per step" if p.long
              else f"{r['tokens_per_s']:,.0f} tokens/s"), flush=True)
    report = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "torch": torch.__version__, "cpus": os.cpu_count(), "cpu": cpu_description(),
              "matmul_roof_flops": roofs, "roof_threads": torch.get_num_threads(),
              "results": results, "long_results": long_results}
    if results or not long_results:
        print(_table(roofs, results))
    if long_results:
        print(f"CPU: {cpu_description()}")
        print(_long_table(long_results))
    _write_json(a.json, report)


def _write_json(path: str, report: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
