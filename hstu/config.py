"""Assemble one run's configuration: a gin file (plus ``--gin-param`` overrides) into
validated argument objects, the :class:`RunConfig`.

The gin sources are read and pre-checked by :mod:`hstu.gin_parsing` (unknown classes and
fields with their file, line and a "did you mean") against the trainer's classes
(:mod:`hstu.args`) and the preprocessor's (:mod:`hstu.data.data_args`). Each argument class
is then built and validated; the checks across fields and classes run from
:mod:`hstu.checks`. A bad value is reported with the file and line that set it. Nothing
heavy (torch process groups, models) exists yet when these errors are raised.

Sits above :mod:`hstu.data` (docs/architecture.md, "Layers").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from hstu import args as A
from hstu import checks
from hstu.data.data_args import DATA_ARG_CLASSES
from hstu.gin_parsing import (
    Binding,
    instantiate,
    parse_sources,
    unrecorded,
    unused_scope_warnings,
    where_set,
)
from hstu.ops.masks import check_window

Task = Literal["ranking", "retrieval"]

# Classes whose instances are declared by scope: every scope bound for one of these is a table.
_TABLE_CLASSES = ("EmbeddingArgs", "DynamicEmbeddingArgs")


@dataclass
class RunConfig:
    """Everything one run is configured with, validated."""

    task: Task
    trainer: A.TrainerArgs
    network: A.NetworkArgs
    optimizer: A.OptimizerArgs
    tp: A.TensorModelParallelArgs
    dataset: A.DatasetArgs | A.BenchmarkDatasetArgs
    tables: list[A.EmbeddingArgs] = field(default_factory=list)
    """Tables declared in gin (by scope) or by BenchmarkDatasetArgs.embedding_args."""
    ranking: A.RankingArgs | None = None
    retrieval: A.RetrievalArgs | None = None
    sources: list[str] = field(default_factory=list)
    """The gin file and overrides this was loaded from."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Instances of data-specific gin classes (hstu.data.data_args), by class name."""
    locations: dict[tuple[str, str, str], str] = field(default_factory=dict, repr=False)
    """(class, field, table name or "") -> "file:line" of the binding that set it, for errors
    found later (sizes from the data, hstu.data.sizes)."""
    warnings: list[str] = field(default_factory=list, repr=False)
    """One line each: bindings that are valid but have no effect (printed at start)."""
    choices: list[str] = field(default_factory=list, repr=False)
    """One line each: what an "auto" setting came to from the data, and why (printed at
    start; hstu.data.sizes)."""
    started: float | None = field(default=None, repr=False)
    """time.monotonic() when the run began (an entry point: its process's first import of
    hstu); TrainerArgs.time_budget_minutes counts from here (None: from the Trainer's start)."""


def _check_task(task: str, bindings: list[Binding], label: str) -> None:
    """A ranking configuration is refused by the retrieval entry point and vice versa."""
    if task == "retrieval":
        other, kind = "RankingArgs", "ranking"
    else:
        other, kind = "RetrievalArgs", "retrieval"
    for b in bindings:
        if b.short_name == other:
            raise A.ConfigError(
                other, b.field_name,
                f"a {kind} setting: this is a {kind} configuration and this entry point trains "
                f"{task}; run it with pretrain_gr_{kind}.py",
            ).with_location(b.where or label)


def _check_window(network: A.NetworkArgs, dataset: Any, task: str) -> None:
    """The semi-local window's settings, by the kernels' own rule (``hstu.ops.masks``), and
    what the cutlass kernel can express of it (a plain sliding window: no contextual tokens,
    no candidates, no min_full_attn_seq_len), before the first step rather than at it."""
    try:
        check_window(network.max_attn_len, network.min_full_attn_seq_len)
    except ValueError as exc:
        field_name = "max_attn_len" if network.max_attn_len < 0 else "min_full_attn_seq_len"
        raise A.ConfigError("NetworkArgs", field_name, str(exc)) from None
    if network.kernel_backend == "cutlass" and network.max_attn_len > 0:
        from hstu.ops.cutlass_attention import fbgemm_window_size

        # None: every contextual feature the dataset has (every built-in one has user_id)
        contextual = getattr(dataset, "contextual_features", None)
        try:
            fbgemm_window_size(network.max_attn_len, network.min_full_attn_seq_len,
                               network.is_causal, contextual is None or len(contextual) > 0,
                               task == "ranking")
        except ValueError as exc:
            raise A.ConfigError("NetworkArgs", "max_attn_len", str(exc)) from None


def load_config(
    config_file: str | None,
    params: Iterable[str] = (),
    task: Task = "retrieval",
    world_size: int | None = None,
) -> RunConfig:
    """Parses, checks and builds the run's arguments. Raises ConfigError (one line).

    Args:
        config_file: path of the .gin file (None: only ``params``).
        params: gin binding strings from ``--gin-param``, applied after the file.
        task: which head's arguments to build.
        world_size: when known, also checks that TP divides it.
    """
    params = list(params)
    label = config_file or "<gin-param>"
    bindings = parse_sources(
        [config_file] if config_file else [], params, (*A.ARG_CLASSES, *DATA_ARG_CLASSES)
    )
    _check_task(task, bindings, label)

    def build(cls: type, scope: str = "") -> Any:
        return instantiate(cls, scope, bindings, label)

    bound = {b.short_name for b in bindings}
    trainer = build(A.TrainerArgs)
    network = build(A.NetworkArgs)
    optimizer = build(A.OptimizerArgs)
    tp = build(A.TensorModelParallelArgs)
    if "BenchmarkDatasetArgs" in bound:
        dataset: Any = build(A.BenchmarkDatasetArgs)
        tables = list(dataset.embedding_args)
    else:
        dataset = build(A.DatasetArgs)
        tables = []
    # Tables declared by scope (e.g. item/DynamicEmbeddingArgs.table_name = ...), first seen first
    # (an unscoped binding that names no table is a default gin gives every scoped table,
    # e.g. "EmbeddingArgs.sharding_override = 'auto'" in an operative config: not a table)
    naming = {(b.scope, b.short_name) for b in bindings
              if b.field_name in ("table_name", "feature_names")}
    table_scopes = dict.fromkeys(
        (b.scope, b.short_name) for b in bindings
        if b.short_name in _TABLE_CLASSES and (b.scope or (b.scope, b.short_name) in naming)
    )
    referenced = {id(t) for t in tables}
    locations: dict[tuple[str, str, str], str] = {
        (b.short_name, b.field_name, ""): b.where
        for b in bindings if b.short_name not in _TABLE_CLASSES
    }
    for scope, short in table_scopes:
        table = build(getattr(A, short), scope)
        for b in bindings:
            if b.scope == scope and b.short_name == short:
                locations[(short, b.field_name, table.table_name)] = b.where
        if id(table) not in referenced:
            tables.append(table)
    if isinstance(dataset, A.BenchmarkDatasetArgs):
        # scoped declarations may repeat the referenced ones; keep one per name+class
        unique: dict[tuple[str, str], A.EmbeddingArgs] = {}
        for t in tables:
            unique.setdefault((t.table_name, type(t).__name__), t)
        tables = list(unique.values())
    # the checks across fields and classes (hstu.checks); each error gets the file:line of
    # the binding that set the field it names
    try:
        checks.check_tables(tables)
        checks.check_parallel(network, tp, world_size)
        checks.check_batch_tokens(trainer, dataset, task)
        checks.check_ema(trainer, tables)
        checks.check_architecture(network, task)
        checks.check_truncation(network, dataset, task)
        _check_window(network, dataset, task)
    except A.ConfigError as exc:
        raise exc.with_location(where_set(bindings, exc.field_name, label, exc.cls_name)) from None
    ranking = build(A.RankingArgs) if task == "ranking" else None
    retrieval = build(A.RetrievalArgs) if task == "retrieval" else None
    try:
        checks.check_history_loss(ranking, dataset, network)
        checks.check_causal(network, ranking, retrieval)
        checks.check_sid_decoding(network, retrieval)
        if isinstance(dataset, A.BenchmarkDatasetArgs):  # real data: resolve_sizes checks
            checks.check_peer_mask(
                network, ranking, retrieval, len(dataset.contextual_feature_names)
            )
        checks.check_rab_query_time(network, dataset, task)
        checks.check_selection(
            trainer, dataset, checks.evaluated_metrics(ranking, retrieval), task
        )
    except A.ConfigError as exc:
        raise exc.with_location(where_set(bindings, exc.field_name, label, exc.cls_name)) from None
    extras = {cls.__name__: build(cls) for cls in DATA_ARG_CLASSES if cls.__name__ in bound}
    sources = ([config_file] if config_file else []) + [f"--gin-param {p}" for p in params]
    return RunConfig(
        task=task,
        trainer=trainer,
        network=network,
        optimizer=optimizer,
        tp=tp,
        dataset=dataset,
        tables=tables,
        ranking=ranking,
        retrieval=retrieval,
        sources=sources,
        extras=extras,
        locations=locations,
        warnings=[*unused_scope_warnings(bindings, _TABLE_CLASSES),
                  *_unread_by_sasrec(network, bindings)],
    )


def _unread_by_sasrec(network: A.NetworkArgs, bindings: list[Binding]) -> list[str]:
    """One line per binding of an HSTU layer option in a run with architecture="sasrec": SASRec's
    block does not read it. The options refused when on (``checks.SASREC_REFUSED``) and
    ``is_causal`` (retrieval refuses False) are left out: bound off, they say how SASRec runs."""
    if network.architecture != "sasrec":
        return []
    from hstu.model.hstu_layer import LayerOptions
    from hstu.model.sasrec import SASRecOptions

    def read_by(options: Any) -> set[str]:
        return {options._NETWORK_NAMES.get(f.name, f.name) for f in fields(options)}

    unread = read_by(LayerOptions) - read_by(SASRecOptions) - {*checks.SASREC_REFUSED, "is_causal"}
    return [
        f"{b.where}: NetworkArgs.{b.field_name}: an option of the HSTU layer; "
        'architecture="sasrec" does not read it (this binding has no effect)'
        for b in bindings
        if b.short_name == "NetworkArgs" and not b.scope and b.field_name in unread
    ]


def _run_tables(cfg: RunConfig) -> tuple[list[A.EmbeddingArgs], str]:
    """(the tables the run builds, the data's item feature): the dataset's predefined tables
    with the gin ones over them (as :func:`hstu.training.builder.build_all` makes them), or
    the benchmark's."""
    if isinstance(cfg.dataset, A.BenchmarkDatasetArgs):
        return list(cfg.tables), cfg.dataset.item_feature_name
    from hstu.data.sizes import info_from_metadata, read_metadata

    info = info_from_metadata(read_metadata(cfg.dataset, cfg.extras), cfg.dataset, cfg.task)
    return info.default_tables(overrides=cfg.tables), info.item_feature_name


def _offered_sharding_types(device_type: str) -> list[str]:
    """The sharding types TorchRec's sequence-embedding sharder offers on ``device_type``
    (imports TorchRec: asked only when a table names a sharding_override)."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    return list(EmbeddingCollectionSharder().sharding_types(device_type))


def check_run(cfg: RunConfig, device_type: str, world_size: int) -> None:
    """The checks that need the run's tables (after :func:`hstu.data.sizes.resolve_sizes`),
    the device it will use ("cpu" or "cuda") and its world size: what the trainer's builder
    would refuse, refused before any process group exists, by the run and by
    ``--check-config`` alike. Raises ConfigError (one line, with the gin file and line)."""
    with unrecorded():  # the dataset's default tables stay out of the operative config
        tables, item_feature = _run_tables(cfg)
    try:
        checks.check_placement(cfg.network, cfg.optimizer, cfg.retrieval, tables, item_feature,
                               device_type, world_size)
        checks.check_item_table_sampling(cfg.retrieval, tables, item_feature)
        if any(t.sharding_override != "auto" for t in tables):
            checks.check_sharding_overrides(tables, _offered_sharding_types(device_type),
                                            device_type)
    except A.ConfigError as exc:
        table = next((t.table_name for t in tables if repr(t.table_name) in exc.message), "")
        where = (cfg.locations.get((exc.cls_name, exc.field_name or "", table))
                 or cfg.locations.get((exc.cls_name, exc.field_name or "", ""))
                 or (cfg.sources[0] if cfg.sources else "<config>"))
        raise exc.with_location(where) from None


__all__ = ["RunConfig", "Task", "check_run", "load_config"]
