"""Builds the parts of a run from its validated arguments: data, tables, model, optimizers.

Runtime objects (process groups, devices) are passed in, never stored in the args.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from hstu.args import (
    STREAM_DATASET,
    BenchmarkDatasetArgs,
    ConfigError,
    DynamicEmbeddingArgs,
    EmbeddingArgs,
    NetworkArgs,
)
from hstu.checks import check_placement, check_table_features
from hstu.config import RunConfig
from hstu.console import format_bytes
from hstu.data import DataInfo, build_data
from hstu.data.negatives import NegativeSampler
from hstu.data.sizes import (
    dynamic_item_table,
    resolve_dropout,
    resolve_head,
    resolve_learning_rate,
    resolve_sampling,
    resolve_temperature,
    resolve_width,
    stream_metadata,
)
from hstu.embeddings import (
    HstuEmbeddings,
    TablePlacement,
    build_embeddings,
    fused_optimizer,
    replicated_optimizers,
    shard_embeddings,
)
from hstu.embeddings.sharding import available_bytes_per_rank, check_tables_fit
from hstu.model import ModelDataInfo, build_model
from hstu.model.model import GenerativeRecommender
from hstu.ops.losses import resolve_matmul_dtype
from hstu.registry import NEGATIVE_SAMPLING
from hstu.training.budget import run_length
from hstu.training.ddp import wrap_dense
from hstu.training.distributed import DistEnv, seed_training_rng
from hstu.training.evaluate import training_item_counts
from hstu.training.optimizer import OptimizerContainer, TableStepGuard, unscale_sparse_gradients


@dataclass
class Built:
    train_loader: Any
    eval_loader: Any
    info: DataInfo
    tables: list[EmbeddingArgs]
    placements: list[TablePlacement]
    model: nn.Module
    optimizer: OptimizerContainer
    total_steps: int
    test_loader: Any = None
    """Scored once with the best checkpoint when TrainerArgs.best_metric selects on validation."""


def table_dims(tables: list[EmbeddingArgs], info: DataInfo, network: NetworkArgs) -> dict[str, int]:
    """Item and action tables take the item dim; every other table the contextual dim."""
    item_like = {info.item_feature_name, info.action_feature_name} - {None}
    return {
        t.table_name: network.resolved_item_embedding_dim if item_like & set(t.feature_names)
        else network.resolved_contextual_embedding_dim
        for t in tables
    }


def model_data_info(
    info: DataInfo, tables: list[EmbeddingArgs], dims: dict[str, int]
) -> ModelDataInfo:
    """What the model needs of the data: the dataset's facts and each feature's table dim
    (``dims``: dim per table name, :func:`table_dims`)."""
    return ModelDataInfo(
        num_items=info.num_items,
        item_feature_name=info.item_feature_name,
        max_item_seqlen=info.max_seqlen,
        action_feature_name=info.action_feature_name,
        contextual_feature_names=list(info.contextual_feature_names),
        feature_dims={f: dims[t.table_name] for t in tables for f in t.feature_names},
        min_item_id=info.first_item_id,
    )


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the embedding tables (those are updated in backward)."""
    sparse = {
        id(p) for m in model.modules() if isinstance(m, HstuEmbeddings) for p in m.parameters()
    }
    return [p for p in model.parameters() if id(p) not in sparse and p.requires_grad]


def data_notes(info: DataInfo) -> list[str]:
    """Warnings with counts about what the protocol leaves out or cannot order."""
    notes = []
    dropped = int(info.metadata.get("dropped_users") or 0)
    if info.users_without_train_sample:
        notes.append(
            f"[hstu] warning: {info.users_without_train_sample} of {info.num_users} users give no "
            "training sample (too few interactions before their evaluation items)"
        )
    if dropped:
        notes.append(
            f"[hstu] warning: the preprocessor dropped {dropped} users with fewer than "
            f"{info.metadata.get('options', {}).get('custom', {}).get('min_user_interactions', 2)} "
            "interactions"
        )
    if info.tied_eval_items:
        notes.append(
            f"[hstu] warning: {info.tied_eval_items} of {info.num_eval_items} evaluation items "
            "share their timestamp with the last history item (ties at the split keep the raw "
            "file's order; coarse timestamps make the split partly arbitrary)"
        )
    if info.cold_items:
        notes.append(
            f"[hstu] cold items: {info.cold_items} of {info.num_items - info.first_item_id} items "
            f"held out of training (DatasetArgs.cold_items): {info.cold_events_dropped} events "
            "dropped from the training sequences; cold/<metric> ranks the evaluation targets "
            "that are cold"
        )
    return notes


def negative_sampler(
    cfg: RunConfig, info: DataInfo, device: torch.device
) -> NegativeSampler | None:
    """Retrieval with uniform, mixed or full-corpus negatives: what the batches carry (the
    index's transpose only for the CPU score kernel, the one that reads it)."""
    if cfg.task != "retrieval" or cfg.network.architecture in ("mlp_baseline", "hstu_sid"):
        return None
    r = cfg.retrieval
    mode = NEGATIVE_SAMPLING[r.negative_sampling].draw(r.num_negatives)
    if mode is None:
        return None
    return NegativeSampler(
        mode=mode,
        num_negatives=max(r.num_negatives, 0),
        min_item_id=info.first_item_id,
        num_items=info.num_items,
        item_feature_name=info.item_feature_name,
        seed=cfg.trainer.seed,
        transpose=device.type == "cpu",
    )


def semantic_ids(cfg: RunConfig, info: DataInfo) -> tuple[np.ndarray, list[int]]:
    """NetworkArgs.architecture="hstu_sid": (each item id's codes int64 [num_items, L], -1 for
    an id without an item; K_l per level) from NetworkArgs.sid_codes, matched by raw item id
    through the dataset's item map (a dataset without one: the codes' ids are its item ids).
    An item of the dataset without codes is refused in one line."""
    from hstu.data.layout import ITEM_MAP_FILE
    from hstu.data.semantic_ids import load_codes

    sid = load_codes(cfg.network.sid_codes, centroids=False)
    levels = sid.codes.shape[1]
    k = int(sid.config["codes"])
    num_codes = [k] * (levels - 1) + [int(sid.codes[:, -1].max()) + 1]
    item_map = Path(getattr(cfg.dataset, "resolved_path", "") or "") / ITEM_MAP_FILE
    if item_map.is_file():
        table = pq.read_table(item_map, columns=["item_id", "raw_item_id"])
        dense = table.column("item_id").to_numpy().astype(np.int64)
        raw = table.column("raw_item_id").to_pylist()
    else:
        dense = np.arange(info.first_item_id, info.num_items, dtype=np.int64)
        raw = dense.tolist()
    where = {str(r): i for i, r in enumerate(sid.item_ids.tolist())}
    at = np.asarray([where.get(str(r), -1) for r in raw], dtype=np.int64)
    if (at < 0).any():
        missing = int((at < 0).sum())
        example = raw[int(np.flatnonzero(at < 0)[0])]
        raise ConfigError(
            "NetworkArgs", "sid_codes",
            f"{cfg.network.sid_codes}: {missing} of the dataset's {len(raw)} items have no codes "
            f"(e.g. raw item id {example!r}); tokenize the dataset's items (python -m "
            "hstu.sid.tokenize, docs/semantic_ids.md)",
        )
    codes = np.full((info.num_items, levels), -1, dtype=np.int64)
    codes[dense] = sid.codes[at]
    return codes, num_codes


def ensure_generated(cfg: RunConfig, env: DistEnv) -> None:
    """The synthetic dataset is generated on first use (local rank 0 of each node; a no-op
    when up to date, and written to a temporary folder then renamed)."""
    ds = cfg.dataset
    if isinstance(ds, BenchmarkDatasetArgs) or ds.dataset_name != "synthetic":
        return
    path = os.path.normpath(ds.resolved_path)
    if os.path.basename(path) != ds.dataset_name:
        return  # a user-chosen folder: it must already hold the data
    if env.local_rank == 0:  # once per node: nodes need not share a filesystem
        from hstu.data.preprocess import preprocess

        preprocess(
            "synthetic", out=os.path.dirname(path) or ".",
            synthetic=cfg.extras.get("SyntheticDataArgs"),
        )
    if dist.is_initialized():
        dist.barrier()


def full_corpus_note(cfg: RunConfig, device: torch.device) -> str | None:
    """The run's line saying in which dtype the full-corpus loss multiplies (None: the run
    has no full-corpus loss)."""
    if cfg.task != "retrieval" or cfg.retrieval.negative_sampling != "full_corpus":
        return None
    dtype, why = resolve_matmul_dtype(cfg.retrieval.full_corpus_matmul_dtype, device)
    return (f"[hstu] full-corpus loss: its [queries x items] matmuls in {str(dtype)[6:]} "
            f"({why}; RetrievalArgs.full_corpus_matmul_dtype)")


def build_all(cfg: RunConfig, env: DistEnv, log: Any = print) -> Built:
    t = cfg.trainer
    ensure_generated(cfg, env)
    # Every rank reads its own samples: embedding lookups are per rank, and with TP the
    # dense part gathers the samples of its TP group (docs/model.md, "Tensor parallelism").
    split_kwargs: dict[str, Any] = {"tp_size": env.tp_size}  # batches carry their TP sizes
    if not isinstance(cfg.dataset, BenchmarkDatasetArgs):
        # with a selection metric, training evaluates on the validation split only
        split_kwargs["split"] = "valid" if t.best_metric is not None else cfg.dataset.eval_split
        split_kwargs["holdout_validation"] = cfg.dataset.holdout_validation
        if cfg.dataset.dataset_name == STREAM_DATASET:
            split_kwargs["stream_metadata"] = stream_metadata(cfg.extras.get("StreamArgs"))
    data_args = (
        cfg.dataset, cfg.task, t.train_batch_size, t.eval_batch_size, env.rank, env.world_size,
        t.seed,
    )
    train_loader, eval_loader, info = build_data(*data_args, **split_kwargs)
    if env.is_main:
        for line in data_notes(info):
            log(line)
    # an "auto" head width from the data (the entry points resolved it already); BCE bits need
    # bitmask actions, a CE head the action classes (one-line ConfigErrors)
    cfg.ranking = resolve_head(info, cfg.ranking)
    test_loader = None
    if t.best_metric is not None:
        _, test_loader, _ = build_data(
            *data_args, split="test", holdout_validation=True, tp_size=env.tp_size
        )
        if cfg.task == "retrieval":  # metrics by the target's training count (TargetCounts)
            counts = training_item_counts(train_loader)
            test_loader.target_counts = eval_loader.target_counts = counts
    if isinstance(cfg.dataset, BenchmarkDatasetArgs):
        tables = list(cfg.tables)
    else:
        tables = info.default_tables(overrides=cfg.tables)
    check_table_features(tables, info)
    # hidden_size and negative_sampling "auto" from the catalogue (the entry points resolved
    # them already)
    cfg.network, width_line = resolve_width(cfg.network, cfg.task, info.num_items,
                                            info.first_item_id)
    if width_line is not None:
        cfg.choices.append(width_line)
    # hidden_dropout "auto" from the data's number of sequences (resolved already, likewise)
    cfg.network, dropout_line = resolve_dropout(cfg.network, info)
    if dropout_line is not None:
        cfg.choices.append(dropout_line)
    cfg.optimizer, lr_line = resolve_learning_rate(cfg.optimizer, info)
    if lr_line is not None:
        cfg.choices.append(lr_line)
    cfg.retrieval, line = resolve_sampling(
        cfg.retrieval, info.num_items, info.first_item_id,
        any(dynamic_item_table(tb, info.item_feature_name) for tb in tables),
    )
    if line is not None:
        cfg.choices.append(line)
    cfg.retrieval, line = resolve_temperature(cfg.retrieval, info.num_items, info.first_item_id)
    if line is not None:
        cfg.choices.append(line)
    if env.is_main:
        for line in cfg.choices:
            log(line)
    sid = None
    if cfg.task == "retrieval" and cfg.network.architecture == "hstu_sid":
        from hstu.model.sid import code_rows, sid_feature_name

        if getattr(cfg.dataset, "dataset_name", None) == STREAM_DATASET or any(
            isinstance(tb, DynamicEmbeddingArgs) and info.item_feature_name in tb.feature_names
            for tb in tables
        ):
            raise ConfigError(
                "NetworkArgs", "architecture",
                '"hstu_sid" reads a static catalogue (its items\' codes); streams and dynamic '
                "item tables are not supported with it yet",
            )
        codes, num_codes = semantic_ids(cfg, info)
        key = sid_feature_name(info.item_feature_name)
        # the code table: every level's codes, one row each (replicated: sum(K_l) rows)
        tables = [*tables, EmbeddingArgs([key], key, sum(num_codes), "data_parallel")]
        rows = code_rows(torch.from_numpy(codes).clamp(min=0), num_codes).numpy()
        for loader in (train_loader, eval_loader, test_loader):
            if loader is not None:
                loader.sid_rows, loader.sid_key = rows, key
        sid = (torch.from_numpy(codes), num_codes)
    sampler = negative_sampler(cfg, info, env.device)
    if sampler is not None:
        # the negatives (or the corpus) are looked up by the item table with the batch
        tables = [
            replace(tb, feature_names=[*tb.feature_names, sampler.feature_name])
            if info.item_feature_name in tb.feature_names else tb
            for tb in tables
        ]
    for loader in (train_loader, eval_loader, test_loader):
        if loader is not None and sampler is not None:
            loader.negatives = sampler
        if loader is not None and cfg.network.rab_query_time:  # hstu.checks.check_rab_query_time
            loader.query_times = True
    dims = table_dims(tables, info, cfg.network)
    if sid is not None:  # an item is the sum of its code rows: the item dim
        dims[sid_feature_name(info.item_feature_name)] = cfg.network.resolved_item_embedding_dim
    available = available_bytes_per_rank(env.device)
    needed = check_tables_fit(
        tables, dims, cfg.optimizer.resolved_sparse_optimizer_str, env.world_size, available,
        weight_average=t.ema_decay > 0,
    )
    if env.is_main:
        have = "" if available[0] is None else f"{format_bytes(available[0])} "
        log(f"[embeddings] tables need at least {format_bytes(needed)} per rank before the plan; "
            f"{have}available ({available[1]})")
    torch.manual_seed(t.seed)
    embeddings = build_embeddings(
        tables,
        dims,
        device=env.device,
        seed=t.seed,
        sparse_optimizer=cfg.optimizer.resolved_sparse_optimizer_str,
        materialize=False,  # each rank allocates its own shards in shard_embeddings
    )
    data_info = model_data_info(info, tables, dims)
    if sid is not None:
        data_info.sid_codes, data_info.sid_num_codes = sid
    task_args = cfg.ranking if cfg.task == "ranking" else cfg.retrieval
    if cfg.network.architecture == "mlp_baseline":
        from hstu.model.baseline import NonSequentialRanking

        model: nn.Module = GenerativeRecommender(embeddings, NonSequentialRanking(
            info.item_feature_name,
            list(info.contextual_feature_names),
            data_info.feature_dims[info.item_feature_name]
            + sum(data_info.feature_dims[n] for n in info.contextual_feature_names),
            list(cfg.ranking.prediction_head_arch),
            cfg.ranking.prediction_head_act_type,
            cfg.ranking.prediction_head_bias,
            cfg.ranking.num_tasks,
            dropout=cfg.network.hidden_dropout,
        ))
    else:
        model = build_model(
            cfg.task, cfg.network, task_args, embeddings, data_info, tp_group=env.tp_group
        )
    model.to(env.device)
    note = full_corpus_note(cfg, env.device)
    if note is not None and env.is_main:
        log(note)
    # the entry points ran these on the same tables (hstu.config.check_run); direct callers
    # of build_all (export, tests) are refused here in the same line
    check_placement(cfg.network, cfg.optimizer, cfg.retrieval, tables, info.item_feature_name,
                    env.device.type, env.world_size)
    _, placements = shard_embeddings(
        model,
        tables,
        cfg.optimizer,
        env.device,
        sharding_overrides={
            tb.table_name: tb.sharding_override for tb in tables if tb.sharding_override != "auto"
        },
        batch_size_per_rank=t.train_batch_size,
        weight_average=t.ema_decay > 0,
    )
    steps_per_epoch = len(train_loader)
    total_steps, _ = run_length(t, steps_per_epoch)
    dense = dense_parameters(model)
    if env.world_size > 1:
        # after sharding: DDP broadcasts the dense weights over the DP group and owns the
        # dense gradient sync (bucketed, overlapping backward; see hstu.training.ddp)
        model.dense = wrap_dense(model.dense, env.dp_group, env.world_size, t.ddp_bucket_cap_mb)
    seed_training_rng(t.seed, env, per_rank=t.dropout_per_rank)
    optimizer = OptimizerContainer(
        dense,
        cfg.optimizer,
        total_steps,
        sparse=fused_optimizer(model),
        tp_group=env.tp_group if env.tp_size > 1 else None,
        sparse_replicated=replicated_optimizers(model),
    )
    if optimizer.scaler is not None:
        # float16: the tables' optimizers update inside backward, from unscaled gradients
        unscale_sparse_gradients(model.dense_module, optimizer.scaler)
        # ... and an overflowing step (on any rank, in any part) leaves them as they were
        optimizer.table_guard = TableStepGuard(model)
    return Built(
        train_loader, eval_loader, info, tables, placements, model, optimizer, total_steps,
        test_loader,
    )
