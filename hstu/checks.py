"""The cross-field checks: refusals that need more than one field, one class, or the data's
metadata. Each raises a one-line :class:`~hstu.validation.ConfigError` naming the class and
field to change; the caller adds the gin file and line (:mod:`hstu.config` for the gin
classes, :func:`hstu.data.sizes.resolve_sizes` and :func:`hstu.data.build.build_data` for
the checks against the data).

Checks of one field stay in each class's ``__post_init__`` (:mod:`hstu.args`). Below
:mod:`hstu.args` and :mod:`hstu.data` (docs/architecture.md, "Layers"): the parameters name
the argument class they take; the data's metadata and ``DataInfo`` arrive as arguments.
Torch-free.
"""

from __future__ import annotations

from typing import Any

from hstu.validation import AUTO, ConfigError, did_you_mean

MAX_BATCH_TOKENS = 2**31 - 1
"""Tokens of one rank's batch: the jagged attention kernels index tokens with int32 offsets."""


# ---------------------------------------------------------------------------- the gin classes
# Parameters take the hstu.args class of their name (``trainer``: TrainerArgs, ``network``:
# NetworkArgs, ``ranking`` / ``retrieval``: RankingArgs / RetrievalArgs or None, ``dataset``:
# DatasetArgs or BenchmarkDatasetArgs).


def _is_dynamic(table: Any) -> bool:
    """``isinstance(table, DynamicEmbeddingArgs)``, without importing hstu.args."""
    return any(cls.__name__ == "DynamicEmbeddingArgs" for cls in type(table).__mro__)


def check_tables(tables: list[Any]) -> None:
    """Table names are unique and none is declared both static and dynamic (``tables``:
    EmbeddingArgs / DynamicEmbeddingArgs)."""
    seen: dict[str, Any] = {}
    features: dict[str, str] = {}
    for table in tables:
        prev = seen.get(table.table_name)
        if prev is not None:
            if _is_dynamic(prev) != _is_dynamic(table):
                raise ConfigError(
                    "DynamicEmbeddingArgs",
                    "table_name",
                    f"table {table.table_name!r} is declared both static (EmbeddingArgs) "
                    "and dynamic (DynamicEmbeddingArgs)",
                )
            raise ConfigError(
                type(table).__name__, "table_name", f"table {table.table_name!r} is declared twice"
            )
        seen[table.table_name] = table
        for name in table.feature_names:
            if name in features:
                raise ConfigError(
                    type(table).__name__,
                    "feature_names",
                    f"feature {name!r} looks up both table {features[name]!r} and "
                    f"{table.table_name!r}",
                )
            features[name] = table.table_name


def check_ema(trainer: Any, tables: list[Any]) -> None:
    """TrainerArgs.ema_decay with a dynamic table: a row is reassigned to a new id on
    eviction, so an average of the rows would mix the evicted id's vector into the new one's."""
    dynamic = [t.table_name for t in tables if _is_dynamic(t)]
    if trainer.ema_decay > 0 and dynamic:
        raise ConfigError(
            "TrainerArgs",
            "ema_decay",
            f"a weight average cannot follow dynamic table {dynamic[0]!r}: its rows are "
            "reassigned to new ids on eviction (set ema_decay = 0, or make the table static)",
        )


def _item_table_problem(sampling: str, table: str, dynamic: bool) -> ConfigError | None:
    """The refusal of ``sampling`` (RetrievalArgs.negative_sampling) over item table ``table``
    (dynamic or static), or None."""
    if sampling == "full_corpus" and dynamic:
        return ConfigError(
            "RetrievalArgs",
            "negative_sampling",
            f"'full_corpus' cannot score dynamic item table {table!r} (DynamicEmbeddingArgs): "
            "its rows are slots, not the catalogue; use negative_sampling='sampled_live' "
            "(in-batch plus uniform negatives over the table's live rows), or a static table",
        )
    if sampling == "sampled_live" and not dynamic:
        return ConfigError(
            "RetrievalArgs",
            "negative_sampling",
            f"'sampled_live' draws over the live rows of a dynamic item table; item table "
            f"{table!r} is static (declare it with DynamicEmbeddingArgs, or use 'mixed_logq')",
        )
    return None


def check_item_table_sampling(retrieval: Any, tables: list[Any], item_feature: str) -> None:
    """RetrievalArgs.negative_sampling against the kind of the item table (``tables``: the
    run's EmbeddingArgs / DynamicEmbeddingArgs; ``item_feature``: the data's item feature):
    "full_corpus" scores the rows each rank holds, and a dynamic table's rows are slots
    (free ones, and ids that come and go), not the catalogue; "sampled_live" draws over a
    dynamic table's live rows, which a static table does not have."""
    if retrieval is None:
        return
    for table in tables:
        if item_feature in table.feature_names:
            problem = _item_table_problem(
                retrieval.negative_sampling, table.table_name, _is_dynamic(table)
            )
            if problem is not None:
                raise problem


def check_full_corpus_table(sparse: Any, item_feature: str) -> None:
    """:func:`check_item_table_sampling`'s "full_corpus" refusal on a built sparse module
    (``sparse``: the model's HstuEmbeddings; anything else: nothing to check)."""
    specs = getattr(sparse, "specs", None)
    table = getattr(sparse, "_feature_to_table", {}).get(item_feature)
    if specs is not None and table is not None:
        problem = _item_table_problem("full_corpus", table, specs[table].dynamic)
        if problem is not None:
            raise problem


def check_live_table(sparse: Any, item_feature: str) -> None:
    """:func:`check_item_table_sampling`'s "sampled_live" refusal on a built sparse module
    (HstuEmbeddings, or EmbeddingsByDim holding several)."""
    for module in [sparse, *getattr(sparse, "groups", {}).values()]:
        table = getattr(module, "_feature_to_table", {}).get(item_feature)
        if table is not None:
            problem = _item_table_problem("sampled_live", table, module.specs[table].dynamic)
            if problem is not None:
                raise problem
            return


def check_full_corpus_optimizer(
    retrieval: Any, optimizer: Any, item_sharding: str | None, world_size: int,
    item_override: str = "auto",
) -> None:
    """RetrievalArgs.negative_sampling="full_corpus" over several ranks with a model_parallel
    item table: each rank's shard takes its whole update through its own lookup, while the
    batch's item rows also pass through TorchRec's lookup, whose fused update then sees a zero
    gradient for them. A no-op under row-wise Adagrad and SGD; FBGEMM's fused Adam would move
    those rows by their momentum and count a second step. ``item_sharding``: the item table's
    EmbeddingArgs.sharding_type (None: no item table); ``item_override``: its
    sharding_override (a column-wise shard holds part of every row: it cannot score items)."""
    if (retrieval is None or retrieval.negative_sampling != "full_corpus" or world_size < 2
            or item_sharding in (None, "data_parallel")):
        return
    if item_override == "column_wise":
        raise ConfigError(
            "EmbeddingArgs", "sharding_override",
            "'column_wise' item table with negative_sampling='full_corpus' on several ranks: each "
            "rank scores the items of its own rows, and a column-wise shard holds part of every "
            "row; use 'row_wise' or 'table_wise'",
        )
    name = optimizer.resolved_sparse_optimizer_str
    if name in ("adam", "adamw"):
        raise ConfigError(
            "OptimizerArgs", "sparse_optimizer_str",
            f"{name!r} with negative_sampling='full_corpus' on {world_size} ranks and a "
            "model_parallel item table: the batch's item rows would take a second, zero-gradient "
            "Adam update each step (momentum moves them); use 'rowwise_adagrad' or 'sgd', or a "
            "data_parallel item table",
        )


def check_sparse_optimizer(optimizer: Any, sharded: list[str], device_type: str) -> None:
    """FBGEMM's CPU kernels have no fused Adam, and TorchRec updates model_parallel (and
    dynamic) tables with fused kernels only: refuse Adam there before FBGEMM fails deep in
    the sharding (``sharded``: the names of the run's model_parallel and dynamic tables;
    ``device_type``: "cpu" or "cuda")."""
    name = optimizer.resolved_sparse_optimizer_str
    if device_type == "cpu" and name in ("adam", "adamw") and sharded:
        raise ConfigError(
            "OptimizerArgs", "sparse_optimizer_str",
            f"{name!r} has no fused CPU kernel in FBGEMM for model_parallel/dynamic tables "
            f"({', '.join(map(repr, sharded))}); on CPU use 'rowwise_adagrad' or 'sgd' "
            "(adam works on GPU)",
        )


def check_sharding_overrides(tables: list[Any], offered: list[str], device_type: str) -> None:
    """Each EmbeddingArgs.sharding_override is a type TorchRec's sequence-embedding sharder
    offers on the run's device (``offered``: its ``sharding_types(device_type)``); TorchRec's
    planner otherwise fails with "No available sharding type"."""
    for table in tables:
        override = table.sharding_override
        if override != "auto" and override not in offered:
            choices = ", ".join(t for t in offered if t != "data_parallel")
            raise ConfigError(
                type(table).__name__, "sharding_override",
                f"table {table.table_name!r}: TorchRec's EmbeddingCollectionSharder (sequence "
                f"embeddings, as HSTU's tables are) does not offer {override!r} on "
                f"{device_type}; choose one of {choices}",
            )


def check_cached_float16(network: Any, tables: list[Any], device_type: str) -> None:
    """float16 skips an overflowing step by restoring the rows it touched, which a table
    behind a UVM cache (DynamicEmbeddingArgs.caching=True, on CUDA) does not allow."""
    cached = [t.table_name for t in tables if getattr(t, "caching", False)]
    if network.dtype_str == "float16" and cached and device_type == "cuda":
        raise ConfigError(
            "NetworkArgs", "dtype_str",
            f"float16 cannot skip an overflowing step of table {cached[0]!r} behind a UVM "
            "cache (DynamicEmbeddingArgs.caching=True): use bfloat16, or caching=False",
        )


def check_placement(
    network: Any, optimizer: Any, retrieval: Any, tables: list[Any], item_feature: str | None,
    device_type: str, world_size: int,
) -> None:
    """The checks that need the run's tables, the device it uses and its world size; run
    by ``--check-config`` (:func:`hstu.config.check_run`) and again by the trainer's builder
    on the tables it builds. ``item_feature``: the data's item feature (None: no item
    table)."""
    sharded = [t.table_name for t in tables if t.sharding_type != "data_parallel"]
    check_sparse_optimizer(optimizer, sharded, device_type)
    check_cached_float16(network, tables, device_type)
    item = next((t for t in tables if item_feature in t.feature_names), None)
    check_full_corpus_optimizer(
        retrieval, optimizer, item and item.sharding_type, world_size,
        item.sharding_override if item is not None else "auto",
    )


def check_parallel(network: Any, tp: Any, world_size: int | None = None) -> None:
    """Heads split evenly over the TP group (``network``: NetworkArgs, ``tp``:
    TensorModelParallelArgs); the TP group divides the world."""
    size = tp.tensor_model_parallel_size
    if network.architecture in ("sasrec", "hstu_sid") and size > 1:
        raise ConfigError(
            "TensorModelParallelArgs", "tensor_model_parallel_size",
            f'{size}: NetworkArgs.architecture="{network.architecture}" runs one process per '
            "model replica (1)",
        )
    if network.compile and size > 1:
        raise ConfigError(
            "NetworkArgs", "compile",
            "True compiles the single-rank layer tail; it is not supported with "
            f"TensorModelParallelArgs.tensor_model_parallel_size={size} (set compile = False)",
        )
    if network.num_attention_heads % size != 0:
        raise ConfigError(
            "NetworkArgs",
            "num_attention_heads",
            f"{network.num_attention_heads} heads do not divide evenly over "
            f"TensorModelParallelArgs.tensor_model_parallel_size={size}",
        )
    if world_size is not None and world_size % size != 0:
        raise ConfigError(
            "TensorModelParallelArgs",
            "tensor_model_parallel_size",
            f"{size} does not divide the world size {world_size}",
        )


def check_batch_tokens(trainer: Any, dataset: Any, task: str) -> None:
    """Each batch's tokens must be addressable by the kernels' int32 offsets (a batch far past
    any device's memory otherwise reaches TorchRec's planner as a storage overflow)."""
    cands = int(getattr(dataset, "max_num_candidates", 0)) if task == "ranking" else 0
    items = int(getattr(dataset, "max_sequence_length", 0) or 0) + cands
    contextual = getattr(dataset, "contextual_feature_names", None) or []
    # upper bound: an action token beside every item, and the contextual tokens in front
    per_sample = 2 * max(items, 1) + len(contextual)
    for name in ("train_batch_size", "eval_batch_size"):
        size = getattr(trainer, name)
        if size * per_sample > MAX_BATCH_TOKENS:
            raise ConfigError(
                "TrainerArgs", name,
                f"{size:,} samples of up to {per_sample:,} tokens are {size * per_sample:,} "
                f"tokens per rank and step; the attention kernels index a batch's tokens with "
                f"32-bit offsets (at most {MAX_BATCH_TOKENS:,})",
            )


def check_sid_decoding(network: Any, retrieval: Any) -> None:
    """The decoding options of semantic ids change nothing for another architecture: refused
    there rather than ignored."""
    if retrieval is None or network.architecture == "hstu_sid":
        return
    for field, unset in (("sid_new_item_spread", 0.0), ("sid_certify", False),
                         ("sid_exclude_history_from_loss", False)):
        if getattr(retrieval, field) != unset:
            raise ConfigError("RetrievalArgs", field,
                              f'is read by NetworkArgs.architecture="hstu_sid" only (architecture '
                              f"is {network.architecture!r}); leave it unset")


SASREC_REFUSED = ("relative_attention_bias", "max_attn_len", "attn_truncation_layers", "compile")
"""HSTU-block options refused with architecture="sasrec" when on (their off value is how
SASRec's block runs anyway)."""


def check_architecture(network: Any, task: str) -> None:
    """The MLP baseline is a ranking model; SASRec a retrieval one, without the HSTU block's
    options it would otherwise ignore."""
    if network.architecture == "mlp_baseline" and task != "ranking":
        raise ConfigError(
            "NetworkArgs", "architecture",
            "mlp_baseline is a ranking baseline; retrieval needs hstu",
        )
    if network.architecture == "hstu_sid":
        if task != "retrieval":
            raise ConfigError("NetworkArgs", "architecture",
                              "hstu_sid is a retrieval model (it decodes the next item); ranking "
                              "needs hstu")
        if not network.sid_codes:
            raise ConfigError("NetworkArgs", "sid_codes",
                              'architecture="hstu_sid" needs the items\' semantic ids (a '
                              "sid_codes.parquet file or its folder: python -m hstu.sid.tokenize)")
        # ("auto" widths are checked where hstu.data.sizes.resolve_width chooses them)
        if isinstance(network.hidden_size, int) and network.hidden_size % network.sid_decoder_heads:
            raise ConfigError("NetworkArgs", "sid_decoder_heads",
                              f"{network.sid_decoder_heads} heads do not divide hidden_size "
                              f"{network.hidden_size}")
    else:
        for field in ("sid_codes", "sid_decoder_dropout", "sid_decoder_attention_dropout"):
            if getattr(network, field) is not None:
                raise ConfigError("NetworkArgs", field,
                                  f'is read by architecture="hstu_sid" only (architecture is '
                                  f"{network.architecture!r}); leave it unset")
        if network.sid_decoder_ffn_multiplier != 4:
            raise ConfigError("NetworkArgs", "sid_decoder_ffn_multiplier",
                              f'is read by architecture="hstu_sid" only (architecture is '
                              f"{network.architecture!r}); leave it at 4")
    if network.architecture != "sasrec":
        return
    if task != "retrieval":
        raise ConfigError(
            "NetworkArgs", "architecture",
            "sasrec is a retrieval model (no candidate masking for ranking); ranking needs hstu",
        )
    for name in SASREC_REFUSED:
        value = getattr(network, name)
        if value:
            raise ConfigError(
                "NetworkArgs", name,
                f"{value!r} is an option of the HSTU block; architecture=\"sasrec\" has none "
                "(leave it at its default)",
            )


def check_truncation(network: Any, dataset: Any, task: str) -> None:
    """Attention truncation keeps each sample's last ``attn_truncation_len`` tokens: a ranking
    sample's candidates (its last tokens) must all be among them, and the padded layout has
    no per-sample slices."""
    if network.attn_truncation_layers == 0:
        return
    if network.sequence_layout != "jagged":
        raise ConfigError(
            "NetworkArgs", "attn_truncation_layers",
            "attention truncation slices each sample's last tokens: it needs "
            'sequence_layout="jagged"',
        )
    candidates = getattr(dataset, "max_num_candidates", 0)
    if task == "ranking" and candidates > network.attn_truncation_len:
        raise ConfigError(
            "NetworkArgs", "attn_truncation_len",
            f"{network.attn_truncation_len} tokens cannot hold the {candidates} candidates "
            "(DatasetArgs.max_num_candidates) of a ranking sample; use at least that many",
        )


def check_history_loss(ranking: Any, dataset: Any, network: Any) -> None:
    """Supervising the history's actions needs them as tokens, and history tokens."""
    if ranking is None or ranking.history_loss_weight <= 0:
        return
    if getattr(dataset, "action_tokens", True) is False:
        raise ConfigError(
            "RankingArgs", "history_loss_weight",
            "needs the history's actions as tokens (DatasetArgs.action_tokens = True)",
        )
    if network.architecture == "mlp_baseline":
        raise ConfigError(
            "RankingArgs", "history_loss_weight",
            "the mlp_baseline has no history tokens to supervise; set it to 0",
        )


def check_causal(network: Any, ranking: Any, retrieval: Any) -> None:
    """Bidirectional attention only where no token's label is another token of the input."""
    if network.is_causal:
        return
    if retrieval is not None:
        why = (
            "retrieval trains next-item prediction from every history position, and "
            "non-causal attention lets each position see the item it predicts; set it to True"
        )
    elif ranking is not None and ranking.history_loss_weight > 0:
        why = (
            "RankingArgs.history_loss_weight > 0 supervises each history item on its own "
            "action, and non-causal attention lets the item's token see that action token; "
            "set it to True or history_loss_weight to 0"
        )
    else:
        return
    raise ConfigError("NetworkArgs", "is_causal", why)


def check_peer_mask(network: Any, ranking: Any, retrieval: Any, num_contextual: int) -> None:
    """The "peer" mask only where no supervised position sees its label through the
    contextual tokens (they see the whole history, and every later layer's history tokens
    see them)."""
    if network.mask_convention != "peer" or num_contextual == 0 or network.num_layers < 2:
        return
    if retrieval is not None:
        label = "the next item"
    elif ranking is not None and ranking.history_loss_weight > 0:
        label = "its own action (RankingArgs.history_loss_weight > 0)"
    else:
        return
    raise ConfigError(
        "NetworkArgs", "mask_convention",
        f'"peer" lets the {num_contextual} contextual token(s) see the whole history, so from '
        f"layer 2 on each supervised history position sees {label} through them; use "
        '"hstu", one layer, or no contextual features',
    )


def check_rab_query_time(network: Any, dataset: Any, task: str) -> None:
    """The query time replaces the next time of a retrieval sample's last token, which is the
    evaluation query only with item tokens alone (docs/model.md, "Relative attention bias")."""
    if not network.rab_query_time:
        return
    if task != "retrieval":
        why = (
            "retrieval only: a ranking sample's last tokens are its candidates, which carry "
            "their own timestamps; set it to False"
        )
    elif not (network.relative_attention_bias and network.rab_use_time):
        why = "needs relative_attention_bias = True and rab_use_time = True (it sets a time bucket)"
    elif not hasattr(dataset, "action_tokens"):
        why = "the benchmark's synthetic batches carry no query times; set it to False"
    elif dataset.action_tokens:
        why = (
            "needs DatasetArgs.action_tokens = False: with interleaved actions the query is the "
            "last item token, whose next token is its own action, not the last token"
        )
    else:
        return
    raise ConfigError("NetworkArgs", "rab_query_time", why)


def evaluated_metrics(ranking: Any, retrieval: Any) -> tuple[str, ...]:
    """The names evaluation reports, which TrainerArgs.best_metric may select on."""
    if ranking is not None:
        return tuple(ranking.eval_metrics) + tuple(
            f"AUC/task{i}" for i in range(ranking.num_tasks) if ranking.num_tasks > 1
        )
    return tuple(retrieval.eval_metrics) if retrieval is not None else ()


def check_selection(
    trainer: Any, dataset: Any, task_metrics: tuple[str, ...], task: str = "ranking"
) -> None:
    """Model selection never looks at the test split: best_metric needs a validation split.
    The label-prior rule is ranking's (retrieval has no label prior)."""
    if trainer.best_requires_loss_below_prior and task != "ranking":
        raise ConfigError(
            "TrainerArgs",
            "best_requires_loss_below_prior",
            f"is for ranking (a label prior's loss to beat); this is a {task} run",
        )
    if trainer.best_metric is None:
        return
    if trainer.best_metric not in task_metrics:
        raise ConfigError(
            "TrainerArgs",
            "best_metric",
            f"{trainer.best_metric!r} is not among the evaluated metrics {list(task_metrics)}"
            + did_you_mean(trainer.best_metric, task_metrics),
        )
    if not getattr(dataset, "holdout_validation", False):
        raise ConfigError(
            "TrainerArgs",
            "best_metric",
            "selecting a checkpoint needs a validation split "
            "(DatasetArgs.holdout_validation = True); hstu never selects on the test split",
        )


# ---------------------------------------------------------------------------- against the data


def check_dataset_name(dataset_args: Any, meta: dict[str, Any], metadata_file: str) -> None:
    """The dataset folder holds the dataset the configuration names (its ``metadata_file``
    says)."""
    if meta.get("dataset") not in (None, dataset_args.dataset_name):
        raise ConfigError(
            "DatasetArgs",
            "dataset_name",
            f"is {dataset_args.dataset_name!r} but {dataset_args.resolved_path} holds "
            f"{meta['dataset']!r} (its {metadata_file}); point dataset_path at the "
            f"{dataset_args.dataset_name} folder or set dataset_name={meta['dataset']!r}",
        )


def check_ranking_data(dataset_args: Any, meta: dict[str, Any]) -> None:
    """Ranking needs candidates, actions to rank by, and the window before the candidates."""
    if dataset_args.max_num_candidates < 1:
        raise ConfigError(
            "DatasetArgs", "max_num_candidates", "ranking needs max_num_candidates >= 1"
        )
    if meta["action_feature_name"] is None:
        raise ConfigError(
            "DatasetArgs", "dataset_name", f"{meta['dataset']} has no action feature to rank by"
        )
    if getattr(dataset_args, "train_full_history", False):
        raise ConfigError(
            "DatasetArgs", "train_full_history", "is a retrieval option; ranking trains on "
            "the most recent window before each user's candidates"
        )


def check_ranking_head(info: Any, ranking_args: Any) -> None:
    """Refuses a BCE head (last width == num_tasks) on actions that are not bitmasks, and a
    cross-entropy head narrower than the action classes (``info``: a
    :class:`hstu.data.info.DataInfo`).

    Task t's label is bit t of the action value. An action vocabulary of 2**m values is a
    bitmask of m flags (KuaiRand: 256, 8 feedback flags), of which a head trains the lowest
    num_tasks; one of at most 2**num_tasks values fits the tasks' bits. Any other vocabulary
    holds classes (ratings), whose bits mean nothing (bit 0 of a rating class is its parity):
    such data needs a head ending in the class count (cross-entropy). A no-op for retrieval.
    """
    values = info.num_action_values
    if ranking_args is None or values is None:
        return
    width, tasks = ranking_args.prediction_head_arch[-1], ranking_args.num_tasks
    if width == AUTO:
        raise ConfigError("RankingArgs", "prediction_head_arch", '"auto" is not resolved yet')
    if width != tasks and values > width:
        raise ConfigError(
            "RankingArgs",
            "prediction_head_arch",
            f"last width {width} (cross-entropy over {width} classes) is narrower than the "
            f"{values} action classes of {info.dataset_name}; end the head in {values} "
            '(or "auto")',
        )
    if width != tasks or values <= 2**tasks or values & (values - 1) == 0:
        return
    raise ConfigError(
        "RankingArgs",
        "prediction_head_arch",
        f"last width {width} == RankingArgs.num_tasks trains task t on bit t of the action "
        f"value, but the {info.dataset_name} actions are {values} classes in [0, {values}), "
        f"not a bitmask (bit 0 of a class is its parity); end the head in {values} for "
        "cross-entropy over the classes",
    )


def check_table_features(tables: list, info: Any) -> None:
    """Every table must serve a feature of the data (one line naming the table otherwise;
    ``info``: a :class:`hstu.data.info.DataInfo`)."""
    known = [info.item_feature_name,
             *([info.action_feature_name] if info.action_feature_name else []),
             *info.contextual_feature_names]
    for tb in tables:
        unknown = [f for f in tb.feature_names if f not in known]
        if unknown:
            raise ConfigError(
                type(tb).__name__, "feature_names",
                f"table {tb.table_name!r} names {unknown}, which {info.dataset_name} does not "
                f"have; its features are {known}",
            )


__all__ = [
    "MAX_BATCH_TOKENS",
    "check_architecture",
    "check_batch_tokens",
    "check_cached_float16",
    "check_causal",
    "check_dataset_name",
    "check_full_corpus_optimizer",
    "check_full_corpus_table",
    "check_history_loss",
    "check_item_table_sampling",
    "check_live_table",
    "check_parallel",
    "check_peer_mask",
    "check_placement",
    "check_rab_query_time",
    "check_ranking_data",
    "check_ranking_head",
    "check_selection",
    "check_sharding_overrides",
    "check_sid_decoding",
    "check_sparse_optimizer",
    "check_table_features",
    "check_tables",
    "evaluated_metrics",
]
