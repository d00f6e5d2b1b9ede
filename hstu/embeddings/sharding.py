"""Shard the embedding tables with TorchRec and fuse the sparse optimizer into backward
(docs/embeddings.md "Sharding" and "Memory per rank").

Only the ``EmbeddingCollection`` inside each :class:`HstuEmbeddings` is sharded (wrapped in
``DistributedModelParallel`` with ``init_data_parallel=False``); the rest of the model is
left to the trainer's own data-parallel wrapper. The replicated (data_parallel) tables,
``HstuEmbeddings.dp_ec``, are not TorchRec's (its data_parallel sequence kernel pools per
sample on CPU): each weight gets a post-accumulate-grad hook that all-reduces its gradient
over the embedding process group, divides it by the group size and steps a row-sparse torch
optimizer (:mod:`hstu.embeddings.optim`). So every table's optimizer sees the MEAN over the
ranks of the per-rank gradients (TorchRec's model-parallel backward divides by the world
size too), as a DDP-wrapped dense part does; the trainer's dense DDP must leave ``dp_ec`` out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from hstu.args import DynamicEmbeddingArgs, EmbeddingArgs, OptimizerArgs, embedding_row_bytes
from hstu.checks import check_sparse_optimizer
from hstu.console import format_bytes
from hstu.embeddings.collection import (
    INIT_BYTES_PER_VALUE,
    HstuEmbeddings,
    TableSpec,
    allocate_weight,
    init_chunk_rows,
    initialise_tables,
    tables_on_meta,
)
from hstu.embeddings.optim import RowSparseOptimizer
from hstu.validation import ConfigError

ShardingOverride = Literal[
    "row_wise", "table_wise", "column_wise", "table_row_wise", "data_parallel"
]

_MODEL_PARALLEL_CHOICES = ["row_wise", "table_wise"]


@dataclass(frozen=True)
class TablePlacement:
    """The resolved plan of one table."""

    table: str
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    bytes_per_rank: dict[int, int]
    """Weight bytes (float32 values only) held by each rank."""
    shards_per_rank: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """(rows, cols) of each shard a rank holds (the whole table on every rank when replicated)."""

    def describe(self) -> str:
        per_rank = ", ".join(
            f"r{r}: {format_bytes(b)}" for r, b in sorted(self.bytes_per_rank.items())
        )
        return (
            f"{self.table}: {self.sharding_type} ({self.compute_kernel}) on ranks {self.ranks} "
            f"[{per_rank}]"
        )


# a dynamic table's remapper per row of capacity: slot id, occupied, last access, count
# (25 B), the sorted index (16 B) and the LRU access log (up to 32 B)
REMAPPER_BYTES_PER_ROW = 73


def available_bytes_per_rank(device: torch.device) -> tuple[int | None, str]:
    """(bytes, where from) a rank can give its tables: free device memory on a GPU; on CPU
    the host's MemAvailable shared by the node's ranks (LOCAL_WORLD_SIZE). None where the
    host does not say (no /proc/meminfo, e.g. macOS): nothing is then refused."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return None, "unknown: this host has no /proc/meminfo"
    if "MemAvailable" not in fields:
        return None, "unknown: /proc/meminfo has no MemAvailable"
    avail = int(fields["MemAvailable"].split()[0]) * 1024
    return avail // local, f"host MemAvailable / {local} local rank(s)"


def init_transient_bytes(rows: int, dim: int) -> int:
    """The transient of writing a table's (or shard's) starting values: one chunk."""
    return min(rows, init_chunk_rows(dim)) * dim * INIT_BYTES_PER_VALUE


def check_tables_fit(
    tables: list[EmbeddingArgs],
    dims: dict[str, int],
    optimizer_str: str,
    world_size: int,
    available: tuple[int | None, str],
    weight_average: bool = False,
) -> int:
    """The estimate before any plan exists: refuses, in one line with the numbers, tables
    that cannot fit a rank even if spread evenly; returns that lower bound of the bytes a
    rank needs.

    A model_parallel or dynamic table counts 1/world of its float32 values, of their
    optimizer state and, with ``weight_average`` (TrainerArgs.ema_decay), of a float32
    copy of them; a data_parallel table all of it on every rank; a dynamic table its
    remapper's state on every rank; plus the largest chunk drawn while writing starting
    values. The figure that decides is per rank from the sharding plan
    (:func:`check_plan_fits`, in :func:`shard_embeddings`, before any table is allocated).
    """
    needed = 0
    transient = 0
    parts = []
    for tb in tables:
        dim = dims[tb.table_name]
        if isinstance(tb, DynamicEmbeddingArgs):
            rows = tb.resolve_hbm(dim, optimizer_str).capacity_rows
            extra = rows * REMAPPER_BYTES_PER_ROW + tb.admission_sketch_bytes
        else:
            rows, extra = int(tb.item_vocab_size_or_capacity), 0
        weights = rows * dim * 4
        held = rows * embedding_row_bytes(dim, optimizer_str) + (weights if weight_average else 0)
        if tb.sharding_type != "data_parallel":
            held //= world_size
        table_bytes = held + extra
        needed += table_bytes
        transient = max(transient, init_transient_bytes(rows, dim))
        what = f"{tb.table_name} {rows:,} x {dim} = {format_bytes(table_bytes)}"
        parts.append((table_bytes, what))
    needed += transient
    avail, source = available
    if avail is not None and needed > avail:
        largest = ", ".join(text for _, text in sorted(parts, reverse=True)[:3])
        raise ConfigError(
            "EmbeddingArgs", None,
            f"the embedding tables need at least {format_bytes(needed)} per rank ({largest}; "
            f"float32 values plus {optimizer_str} state"
            f"{' and the weight average' if weight_average else ''}, over {world_size} rank(s)) "
            f"but a rank has {format_bytes(avail)} ({source}): lower "
            "NetworkArgs.item_embedding_dim, "
            "give a large table a capacity (DynamicEmbeddingArgs), or run fewer ranks per host",
        )
    return needed


@dataclass
class RankMemory:
    """What one rank holds of the tables (bytes), from the sharding plan."""

    values: int = 0
    """float32 values of its shards and of every replicated table."""
    state: int = 0
    """their optimizer state."""
    average: int = 0
    """the weight average's float32 copy of its values (TrainerArgs.ema_decay)."""
    remappers: int = 0
    """dynamic tables' remapper state, admission sketches included (replicated)."""
    transient: int = 0
    """the largest chunk drawn while writing starting values."""

    @property
    def total(self) -> int:
        return self.values + self.state + self.average + self.remappers + self.transient

    def describe(self) -> str:
        parts = [
            f"values {format_bytes(self.values)}", f"optimizer state {format_bytes(self.state)}"
        ]
        if self.average:
            parts.append(f"weight average {format_bytes(self.average)}")
        if self.remappers:
            parts.append(f"remappers {format_bytes(self.remappers)}")
        parts.append(f"init chunk {format_bytes(self.transient)}")
        return f"{format_bytes(self.total)} = " + " + ".join(parts)


def memory_per_rank(
    placements: list[TablePlacement],
    specs: dict[str, TableSpec],
    optimizer_str: str,
    world_size: int,
    weight_average: bool = False,
) -> dict[int, RankMemory]:
    """rank -> what it will hold, from the resolved plan (shards by rank and size) of the
    tables ``specs`` (every table of the model, by name)."""
    out = {r: RankMemory() for r in range(world_size)}
    for p in placements:
        spec = specs[p.table]
        for rank, shards in p.shards_per_rank.items():
            mem = out[rank]
            for rows, cols in shards:
                values = rows * cols * 4
                mem.values += values
                mem.state += rows * embedding_row_bytes(cols, optimizer_str) - values
                mem.average += values if weight_average else 0
                mem.transient = max(mem.transient, init_transient_bytes(rows, spec.embedding_dim))
    for spec in specs.values():
        if spec.dynamic:
            for mem in out.values():
                mem.remappers += spec.num_rows * REMAPPER_BYTES_PER_ROW + spec.sketch_bytes
    return out


def check_plan_fits(
    memory: dict[int, RankMemory],
    available: list[tuple[int | None, str]],
    optimizer_str: str,
) -> None:
    """Refuses, in one line naming the rank and its figures, a plan whose shards do not fit
    a rank's memory. ``available``: per rank (bytes or None, where from)."""
    for rank in sorted(memory):
        avail, source = available[rank]
        mem = memory[rank]
        if avail is not None and mem.total > avail:
            raise ConfigError(
                "EmbeddingArgs", None,
                f"rank {rank} of {len(memory)} would hold {mem.describe()} of embedding tables "
                f"({optimizer_str}) but has {format_bytes(avail)} ({source}): run more ranks, "
                "lower NetworkArgs.item_embedding_dim, or give a large table a capacity "
                "(DynamicEmbeddingArgs)",
            )


def sparse_optimizer_spec(
    optimizer_args: OptimizerArgs, fused: bool
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """(class, kwargs) of the sparse optimizer.

    fused=True: a class TorchRec maps onto an FBGEMM fused kernel (model_parallel tables);
    fused=False: a torch optimizer that really steps, with the same row-sparse semantics
    (the dense kernel of data_parallel tables).
    ``adamw`` uses Adam: OptimizerArgs.weight_decay applies to dense parameters only, and
    without decay AdamW and Adam are the same update. ``eps`` is OptimizerArgs.adam_eps
    for every family.
    """
    name = optimizer_args.resolved_sparse_optimizer_str
    lr = optimizer_args.sparse_learning_rate or optimizer_args.learning_rate
    b1, eps = optimizer_args.adam_beta1, optimizer_args.adam_eps
    b2 = optimizer_args.sparse_adam_beta2
    b2 = optimizer_args.adam_beta2 if b2 is None else b2
    if name in ("adam", "adamw"):
        if fused:
            return trec_optim.Adam, {"lr": lr, "beta1": b1, "beta2": b2, "eps": eps}
        return RowSparseOptimizer, {"kind": "adam", "lr": lr, "betas": (b1, b2), "eps": eps}
    if name == "sgd":
        return (trec_optim.SGD if fused else torch.optim.SGD), {"lr": lr}
    if name == "rowwise_adagrad":
        if fused:
            return trec_optim.RowWiseAdagrad, {"lr": lr, "eps": eps}
        return RowSparseOptimizer, {"kind": "rowwise_adagrad", "lr": lr, "eps": eps}
    raise ValueError(f"unknown sparse optimizer {name!r}")


def _find_embedding_modules(module: nn.Module) -> list[HstuEmbeddings]:
    return [m for m in module.modules() if isinstance(m, HstuEmbeddings)]


def _constraints(
    emb: HstuEmbeddings,
    tables: dict[str, EmbeddingArgs],
    overrides: dict[str, str],
    device: torch.device,
    offered: list[str],
) -> dict[str, ParameterConstraints]:
    """The planner's constraints; ``offered``: the sharding types TorchRec's sharder offers."""
    out: dict[str, ParameterConstraints] = {}
    for name, spec in emb.specs.items():
        declared = tables[name].sharding_type if name in tables else spec.sharding_type
        if declared == "data_parallel" or name not in emb.ec.embeddings:
            if name in overrides:
                raise ValueError(
                    f"table {name!r} is data_parallel; a sharding override "
                    f"{overrides[name]!r} applies to model_parallel tables only"
                )
            continue
        types = [overrides[name]] if name in overrides else list(_MODEL_PARALLEL_CHOICES)
        if types == ["data_parallel"]:
            raise ValueError(
                f"table {name!r} is model_parallel; override it in EmbeddingArgs instead"
            )
        if name in overrides and overrides[name] not in offered:
            # else TorchRec's planner fails with a traceback ("No available sharding type")
            mp = ", ".join(t for t in offered if t != "data_parallel")
            raise ConfigError(
                "EmbeddingArgs",
                "sharding_override",
                f"table {name!r}: TorchRec's EmbeddingCollectionSharder (sequence embeddings, "
                f"as HSTU's tables are) does not offer {overrides[name]!r} on {device.type}; "
                f"choose one of {mp}",
            )
        kwargs: dict[str, Any] = {}
        if spec.caching and device.type == "cuda":
            kernels = ["fused_uvm_caching"]
            from torchrec.distributed.types import CacheParams

            kwargs["cache_params"] = CacheParams(load_factor=spec.cache_rows / spec.num_rows)
        else:
            # Pinned: on CPU the planner may otherwise pick a GPU-only kernel.
            kernels = ["fused"]
        out[name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels, **kwargs)
    return out


def _placements(plan: ShardingPlan, emb: HstuEmbeddings, world_size: int) -> list[TablePlacement]:
    """The sharded collection's tables as the plan places them, then the replicated
    (data_parallel) tables, whole on every rank."""

    def whole(name: str) -> dict[int, list[tuple[int, int]]]:
        spec = emb.specs[name]
        return {r: [(spec.num_rows, spec.embedding_dim)] for r in range(world_size)}

    def placement(name: str, sharding: str, kernel: str,
                  shards: dict[int, list[tuple[int, int]]]) -> TablePlacement:
        per_rank = {r: sum(rows * cols * 4 for rows, cols in sh) for r, sh in shards.items()}
        return TablePlacement(name, sharding, kernel, sorted(shards), per_rank, shards)

    result = []
    for name, ps in (plan.get_plan_for_module("") or {}).items():  # type: ignore[union-attr]
        shards: dict[int, list[tuple[int, int]]] = {}
        if ps.sharding_type == "data_parallel":
            shards = whole(name)
        else:
            for shard in ps.sharding_spec.shards:  # type: ignore[union-attr]
                rows, cols = shard.shard_sizes
                shards.setdefault(shard.placement.rank(), []).append((rows, cols))
        result.append(placement(name, ps.sharding_type, ps.compute_kernel, shards))
    replicated = emb.dp_ec.embeddings if emb.dp_ec is not None else {}
    return result + [placement(name, "data_parallel", "replicated", whole(name))
                     for name in replicated]


def shard_embeddings(
    module_or_model: nn.Module,
    tables: list[EmbeddingArgs],
    optimizer_args: OptimizerArgs,
    device: torch.device | str,
    pg: dist.ProcessGroup | None = None,
    sharding_overrides: dict[str, ShardingOverride] | None = None,
    batch_size_per_rank: int = 512,
    hbm_cap_bytes: int | None = None,
    available: tuple[int | None, str] | None = None,
    weight_average: bool = False,
) -> tuple[nn.Module, list[TablePlacement]]:
    """Shards every :class:`HstuEmbeddings` in ``module_or_model`` in place.

    Tables still on the meta device (``build_embedding_collection(materialize=False)``)
    are allocated here shard by shard: each rank allocates only what the plan gives it
    (TorchRec's sharded kernels allocate the local shards and their optimizer state) and
    writes their starting values (:func:`hstu.embeddings.collection.initialise_tables`);
    replicated tables are allocated and written whole on every rank. Before anything is
    allocated, what each rank will hold is checked against its memory
    (:func:`check_plan_fits`).

    Args:
        module_or_model: an HstuEmbeddings, or a model holding one (only it is touched).
        tables: the table arguments the module was built from (sharding_type per table).
        optimizer_args: sparse optimizer family, sparse lr, betas (sparse_adam_beta2) and eps.
        device: compute device of the tables.
        pg: embedding process group (default: the world). Every rank of it must call.
        sharding_overrides: table -> forced TorchRec sharding type for model_parallel tables.
        batch_size_per_rank: the planner's batch size hint.
        hbm_cap_bytes: per-device memory budget for the planner (default: TorchRec's).
        available: (bytes or None, where from) this rank can give its tables; default:
            :func:`available_bytes_per_rank` measured now. Every rank's is gathered so that
            all refuse together.
        weight_average: TrainerArgs.ema_decay > 0 (a float32 copy of each rank's values).

    Returns:
        (module_or_model, placements): the same object (sharded in place) and the
        resolved plan, also printed once on rank 0 with what each rank holds.
    """
    device = torch.device(device)
    pg = pg or dist.group.WORLD
    world_size = dist.get_world_size(pg)
    by_name = {t.table_name: t for t in tables}
    overrides = dict(sharding_overrides or {})
    unknown = set(overrides) - set(by_name)
    if unknown:
        raise ValueError(f"sharding_overrides name unknown tables: {sorted(unknown)}")
    optimizer_str = optimizer_args.resolved_sparse_optimizer_str
    # 1. a plan per module, nothing allocated yet
    planned: list[tuple[HstuEmbeddings, ShardingPlan, list[EmbeddingCollectionSharder], bool]] = []
    placements: list[TablePlacement] = []
    for emb in _find_embedding_modules(module_or_model):
        for remapper in emb.remappers.values():
            remapper.pg = pg
        ec = emb.ec
        on_meta = tables_on_meta(emb)
        # model_parallel tables: optimizer class/kwargs become FBGEMM fused params.
        fused_cls, fused_kwargs = sparse_optimizer_spec(optimizer_args, fused=True)
        sharded = [name for name, spec in emb.specs.items()
                   if by_name.get(name, spec).sharding_type != "data_parallel"]
        mp_weights = [ec.embeddings[name].weight for name in sharded]
        if mp_weights:
            check_sparse_optimizer(optimizer_args, sharded, device.type)
            _apply_optimizer_in_backward(fused_cls, mp_weights, fused_kwargs)
        topology = Topology(
            world_size=world_size,
            compute_device=device.type,
            local_world_size=world_size if device.type == "cpu" else None,
            **({} if hbm_cap_bytes is None else {"hbm_cap": hbm_cap_bytes}),
        )
        sharders = [EmbeddingCollectionSharder()]
        offered = sharders[0].sharding_types(device.type)
        constraints = _constraints(emb, by_name, overrides, device, offered)
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=batch_size_per_rank, constraints=constraints
        )
        plan = planner.collective_plan(ec, sharders, pg)
        planned.append((emb, plan, sharders, on_meta))
        placements += _placements(plan, emb, world_size)
    # 2. what each rank will hold, refused together before any allocation
    specs = {name: spec for emb, *_ in planned for name, spec in emb.specs.items()}
    memory = memory_per_rank(placements, specs, optimizer_str, world_size, weight_average)
    mine = available if available is not None else available_bytes_per_rank(device)
    every: list[Any] = [None] * world_size
    dist.all_gather_object(every, mine, group=pg)
    if dist.get_rank(pg) == 0:
        lines = "\n".join("  " + p.describe() for p in placements)
        held = "\n".join(
            f"  rank {r}: {memory[r].describe()}"
            + ("" if every[r][0] is None else f" of {format_bytes(every[r][0])}")
            + f" ({every[r][1]})"
            for r in range(world_size)
        )
        print(f"[embeddings] sharding plan over {world_size} rank(s):\n{lines}\n"
              f"[embeddings] held per rank:\n{held}", flush=True)
    check_plan_fits(memory, every, optimizer_str)
    # 3. allocation: each rank its own shards, then their starting values
    for emb, plan, sharders, on_meta in planned:
        emb.ec = DistributedModelParallel(
            module=emb.ec,
            env=ShardingEnv.from_process_group(pg),
            device=device,
            plan=plan,
            sharders=sharders,
            init_data_parallel=False,
        )
        _replicate_data_parallel(emb, optimizer_args, pg, world_size, device)
        if on_meta:
            initialise_tables(emb)
    return module_or_model, placements


class _SyncAndStep:
    """Post-accumulate-grad hook of a replicated weight: mean of the gradient over ``pg``,
    then the weight's own optimizer step.

    It must not hold the weight nor its optimizer: autograd references the hook from C++,
    out of the garbage collector's sight, so such a cycle is never freed, and it would keep
    the table and, through ``pg``, the process group (and its gloo threads) alive until
    interpreter shutdown (see :func:`hstu.training.distributed.destroy_distributed`). The
    optimizer is found on the parameter the hook receives.
    """

    def __init__(self, pg: dist.ProcessGroup, world_size: int) -> None:
        self.pg = pg
        self.world_size = world_size

    def __call__(self, param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=self.pg)
        param.grad.div_(self.world_size)  # gloo has no AVG
        for opt in param._in_backward_optimizers:
            opt.step()
        param.grad = None


def _replicate_data_parallel(
    emb: HstuEmbeddings,
    optimizer_args: OptimizerArgs,
    pg: dist.ProcessGroup,
    world_size: int,
    device: torch.device,
) -> None:
    """Replicated tables: allocated whole on every rank (still on the meta device: their
    values are then written by the same rule everywhere, so no broadcast), averaged
    gradients, optimizer in backward."""
    if emb.dp_ec is None:
        return
    cls, kwargs = sparse_optimizer_spec(optimizer_args, fused=False)
    for module in emb.dp_ec.embeddings.values():
        if module.weight.device.type == "meta":
            allocate_weight(module, device)
        weight = module.weight
        weight._in_backward_optimizers = [cls([weight], **kwargs)]
        weight.register_post_accumulate_grad_hook(_SyncAndStep(pg, world_size))


def fused_optimizer(module_or_model: nn.Module) -> list[torch.optim.Optimizer]:
    """The fused (model_parallel) optimizers of every sharded HstuEmbeddings."""
    return [emb.ec.fused_optimizer for emb in _find_embedding_modules(module_or_model)
            if isinstance(emb.ec, DistributedModelParallel)]


def replicated_optimizers(module_or_model: nn.Module) -> list[torch.optim.Optimizer]:
    """The in-backward optimizers of the replicated (data_parallel) tables."""
    out: list[torch.optim.Optimizer] = []
    for emb in _find_embedding_modules(module_or_model):
        if emb.dp_ec is None:
            continue
        for module in emb.dp_ec.embeddings.values():
            out.extend(getattr(module.weight, "_in_backward_optimizers", []))
    return out


__all__ = [
    "RankMemory",
    "TablePlacement",
    "check_plan_fits",
    "check_tables_fit",
    "fused_optimizer",
    "memory_per_rank",
    "replicated_optimizers",
    "shard_embeddings",
    "sparse_optimizer_spec",
]
