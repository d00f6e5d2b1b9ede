"""Sizes from the data, before any process starts.

The entry points call :func:`resolve_sizes` right after loading the gin file (also for
``--check-config``): it reads the preprocessed folder's ``metadata.json`` (nothing else), fills
in every ``"auto"`` size (table rows, the action table's classes, the ranking head's last
width) and refuses, in one line, a fixed size that is too small or a head that does not fit
the actions (the checks themselves live in :mod:`hstu.checks`). The builder applies the same
functions to the loaded data, so a config built by hand (tests, notebooks) gets the same
answers. Torch-free.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hstu.args import (
    AUTO,
    STREAM_DATASET,
    BenchmarkDatasetArgs,
    ConfigError,
    DatasetArgs,
    NetworkArgs,
    RankingArgs,
    RetrievalArgs,
)
from hstu.checks import (
    check_dataset_name,
    check_peer_mask,
    check_ranking_head,
    check_table_features,
)
from hstu.data import layout
from hstu.data.info import DataInfo
from hstu.data.layout import METADATA_FILE


def action_kind(meta: dict[str, Any]) -> str | None:
    """"classes" (rating classes) or "bitmask" (KuaiRand flags); None without actions.
    Folders written before the field existed: KuaiRand is a bitmask, the rest classes."""
    if meta.get("action_feature_name") is None:
        return None
    kind = meta.get("action_kind")
    if kind is None:
        kind = "bitmask" if str(meta.get("dataset", "")).startswith("kuairand") else "classes"
    return kind


def read_metadata(dataset: DatasetArgs, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """metadata.json of the dataset's folder. The synthetic set, when not generated yet, is
    generated in memory (deterministic, a fraction of a second) and nothing is written."""
    if dataset.dataset_name == STREAM_DATASET:
        return stream_metadata((extras or {}).get("StreamArgs"))
    path = Path(dataset.resolved_path)
    if dataset.dataset_name == "synthetic" and not (path / METADATA_FILE).is_file():
        from hstu.data.data_args import SyntheticDataArgs
        from hstu.data.preprocess import build_metadata, group
        from hstu.data.synthetic import generate_synthetic

        synthetic = (extras or {}).get("SyntheticDataArgs") or SyntheticDataArgs()
        grouped = group(generate_synthetic(synthetic))
        return build_metadata("synthetic", grouped, {}, {})
    from hstu.registry import DATASETS

    name = dataset.dataset_name
    how = f"--dataset {name} --raw PATH" if name in DATASETS else (
        "--dataset custom --raw FILE --name " + name
    )
    return layout.read_metadata(path, how)


def stream_metadata(stream: Any) -> dict[str, Any]:
    """The metadata of DatasetArgs.dataset_name = "stream": no preprocessed folder, the item
    table sized by StreamArgs.item_capacity (dense ids 1..capacity in order of first appearance
    on the stream), actions from StreamArgs.rating_classes, no contextual features."""
    if stream is None or stream.item_capacity is None:
        raise ConfigError(
            "StreamArgs", "item_capacity",
            'DatasetArgs.dataset_name = "stream" (no preprocessed dataset) sizes the item table '
            "from StreamArgs.item_capacity: set it to the most distinct items the stream brings",
        )
    classes = stream.rating_classes
    return {
        "format_version": 1, "dataset": STREAM_DATASET, "num_users": 0,
        "num_items": int(stream.item_capacity) + 1, "item_feature_name": "item_id",
        "action_feature_name": "action" if classes else None, "num_action_values": classes,
        "action_kind": "classes" if classes else None, "contextual_feature_names": [],
        "contextual_vocab_sizes": {}, "options": {},
    }


def select_contextual(available: list[str], wanted: list[str] | None) -> list[str]:
    """The contextual features to feed: all (None) or the named ones, which must exist."""
    if wanted is None:
        return available
    for name in wanted:
        if name not in available:
            from hstu.args import did_you_mean

            raise ConfigError(
                "DatasetArgs",
                "contextual_features",
                f"{name!r} is not a contextual feature of this dataset {available}"
                + did_you_mean(name, available),
            )
    return list(wanted)


def info_from_metadata(meta: dict[str, Any], dataset: DatasetArgs, task: str) -> DataInfo:
    """The DataInfo build_data gives (features selected as the loaders do), sample counts
    left at 0."""
    action = meta["action_feature_name"] if dataset.action_tokens else None
    contextual = select_contextual(
        list(meta["contextual_feature_names"]), dataset.contextual_features
    )
    return DataInfo(
        dataset_name=meta["dataset"],
        task=task,
        num_items=int(meta["num_items"]),
        item_feature_name=meta["item_feature_name"],
        action_feature_name=action,
        contextual_feature_names=contextual,
        contextual_vocab_sizes={n: int(meta["contextual_vocab_sizes"][n]) for n in contextual},
        num_action_values=meta.get("num_action_values"),
        max_seqlen=dataset.max_sequence_length
        + (dataset.max_num_candidates if task == "ranking" else 0),
        num_train_samples=0,
        num_eval_samples=0,
        num_users=int(meta.get("num_users", 0)),
        first_item_id=0 if meta.get("options", {}).get("keep_item_ids") else 1,
        metadata=meta,
    )


def resolve_head(info: DataInfo, ranking: RankingArgs | None) -> RankingArgs | None:
    """The ranking head with an "auto" last width resolved, then checked against the actions:
    "auto" = the number of action classes (cross-entropy), or num_tasks for bitmask actions
    (one BCE per task)."""
    if ranking is None or ranking.prediction_head_arch[-1] != AUTO:
        check_ranking_head(info, ranking)
        return ranking
    values = info.num_action_values
    if values is None:
        raise ConfigError(
            "RankingArgs",
            "prediction_head_arch",
            f'"auto" ends the head in the action classes, but {info.dataset_name} has no actions',
        )
    kind = action_kind(info.metadata) if info.metadata else "classes"
    width = ranking.num_tasks if kind == "bitmask" else int(values)
    resolved = dataclasses.replace(
        ranking, prediction_head_arch=[*ranking.prediction_head_arch[:-1], width]
    )
    check_ranking_head(info, resolved)
    return resolved


def resolve_sizes(cfg: Any) -> Any:
    """``cfg`` (a RunConfig) with every "auto" size resolved from the dataset's metadata and
    every fixed size checked; raises a one-line ConfigError / DataError. Benchmark configs
    (no data) are returned as they are. ``cfg.locations`` (when present) adds the gin file
    and line of the offending binding to the error."""
    if isinstance(cfg.dataset, BenchmarkDatasetArgs):
        return cfg
    where = getattr(cfg, "locations", {}) or {}
    meta = read_metadata(cfg.dataset, cfg.extras)
    try:
        check_dataset_name(cfg.dataset, meta, METADATA_FILE)
    except ConfigError as exc:
        location = where.get(("DatasetArgs", "dataset_name", "")) or _source(cfg)
        raise exc.with_location(location) from None
    info = info_from_metadata(meta, cfg.dataset, cfg.task)
    try:
        network, width_line = resolve_width(cfg.network, cfg.task, info.num_items,
                                            info.first_item_id)
    except ConfigError as exc:
        loc = where.get(("NetworkArgs", "hidden_size", ""))
        raise exc.with_location(loc or _source(cfg)) from None
    try:
        network, dropout_line = resolve_dropout(network, info)
    except ConfigError as exc:
        loc = where.get(("NetworkArgs", "hidden_dropout", ""))
        raise exc.with_location(loc or _source(cfg)) from None
    try:
        optimizer, lr_line = resolve_learning_rate(cfg.optimizer, info)
    except ConfigError as exc:
        loc = where.get(("OptimizerArgs", "learning_rate", ""))
        raise exc.with_location(loc or _source(cfg)) from None
    from hstu.gin_parsing import unrecorded

    try:
        with unrecorded():  # the default tables stay out of the operative config
            tables = info.default_tables(overrides=cfg.tables) if cfg.tables else []
        check_table_features(tables, info)
    except ConfigError as exc:
        loc = next((v for (cls, fld, table), v in where.items()
                    if cls == exc.cls_name and fld == exc.field_name and table
                    and repr(table) in exc.message), None)
        raise exc.with_location(loc or _source(cfg)) from None
    # keep only the gin-declared tables (the builder adds the defaults)
    declared = {t.table_name for t in cfg.tables}
    dynamic = any(dynamic_item_table(t, info.item_feature_name) for t in tables)
    tables = [t for t in tables if t.table_name in declared]
    try:
        ranking = resolve_head(info, cfg.ranking)
    except ConfigError as exc:
        loc = where.get(("RankingArgs", "prediction_head_arch", ""))
        raise exc.with_location(loc or _source(cfg)) from None
    try:
        retrieval, line = resolve_sampling(cfg.retrieval, info.num_items, info.first_item_id,
                                           dynamic)
    except ConfigError as exc:
        loc = where.get(("RetrievalArgs", "negative_sampling", ""))
        raise exc.with_location(loc or _source(cfg)) from None
    retrieval, temperature_line = resolve_temperature(retrieval, info.num_items,
                                                      info.first_item_id)
    try:
        check_peer_mask(cfg.network, ranking, retrieval, len(info.contextual_feature_names))
    except ConfigError as exc:
        loc = where.get(("NetworkArgs", "mask_convention", ""))
        raise exc.with_location(loc or _source(cfg)) from None
    choices = [*cfg.choices, *(x for x in (width_line, dropout_line, lr_line, line,
                                           temperature_line) if x)]
    return dataclasses.replace(cfg, network=network, tables=tables, ranking=ranking,
                               retrieval=retrieval, optimizer=optimizer, choices=choices)


def dynamic_item_table(table: Any, item_feature: str) -> bool:
    """Whether ``table`` is a DynamicEmbeddingArgs holding the item feature."""
    from hstu.args import DynamicEmbeddingArgs

    return isinstance(table, DynamicEmbeddingArgs) and item_feature in table.feature_names


def _source(cfg: Any) -> str:
    return cfg.sources[0] if cfg.sources else "<config>"


def _first_that_holds(table: tuple, count: int, unit: str) -> tuple[Any, str]:
    """The value of ``table`` ((at most this many, value), ..., (None, value)) for ``count``
    ``unit``, and why: "N unit, at most L" or "N unit, more than L" (the last limit)."""
    for limit, value in table:
        if limit is None or count <= limit:
            break
    why = (f"{count} {unit}, at most {limit:,}" if limit is not None
           else f"{count} {unit}, more than {table[-2][0]:,}")
    return value, why


AUTO_WIDTHS = ((5000, 50), (None, 128))
"""NetworkArgs.hidden_size="auto": (at most this many items, width), the first that holds.
Measured on validation (docs/results.md "Own data: the recipe that sizes itself"): 50 is
the width tuned on ML-100K (1,682 items) and kept on ML-1M (3,706); on 14,173 Instacart
products 128 gave a better NDCG@10 than 50 inside the same 10-minute budget."""


def resolve_width(network: NetworkArgs, task: str, num_items: int, first_item_id: int
                  ) -> tuple[NetworkArgs, str | None]:
    """NetworkArgs with hidden_size="auto" resolved from a catalogue of ids
    [first_item_id, num_items), and the line that says what was chosen and why; (network,
    None) when it is not "auto". "auto" sizes a retrieval model: refused for ranking."""
    if network.hidden_size != AUTO:
        return network, None
    if task != "retrieval":
        raise ConfigError("NetworkArgs", "hidden_size",
                          '"auto" sizes a retrieval model from its catalogue; give the ranking '
                          "model's width")
    items = num_items - first_item_id
    width, why = _first_that_holds(AUTO_WIDTHS, items, "items")
    if network.architecture == "hstu_sid" and width % network.sid_decoder_heads:
        raise ConfigError("NetworkArgs", "sid_decoder_heads",
                          f'{network.sid_decoder_heads} heads do not divide hidden_size "auto" '
                          f"= {width} ({items} items)")
    follows = ' (kv_channels "auto" follows it)' if network.kv_channels == AUTO else ""
    return (dataclasses.replace(network, hidden_size=width),
            f'[hstu] hidden_size "auto" -> {width}{follows}: {why}')


AUTO_DROPOUTS = ((2000, 0.5), (None, 0.2))
"""NetworkArgs.hidden_dropout="auto": (at most this many sequences in the dataset, dropout),
the first that holds. Measured on validation inside the recipe's 10-minute budget
(docs/results.md "Own data: the recipe that sizes itself"): 0.5 is the dropout tuned on
ML-100K (943 sequences, over 100 epochs in the budget); on ML-1M (6,040 sequences, about 10
epochs) and Instacart's orders (14,385, about 20) 0.2 reached a far better NDCG@10 than 0.5.
Between 943 and 6,040 sequences the limit is not measured."""


def _by_sequences(args: Any, field_name: str, table: tuple, info: Any, what: str
                  ) -> tuple[Any, str | None]:
    """``args`` with its ``field_name`` "auto" resolved from ``table`` ((at most this many
    sequences, value), the first that holds) by the dataset's number of sequences (``info``:
    a DataInfo, its ``num_users``), and the line that says what was chosen and why; (args,
    None) when it is not "auto". ``what`` names the value in the refusal."""
    if args is None or getattr(args, field_name) != AUTO:
        return args, None
    sequences = int(getattr(info, "num_users", 0) or 0)
    if sequences <= 0:
        raise ConfigError(type(args).__name__, field_name,
                          f'"auto" reads the number of sequences from the dataset\'s '
                          f"{METADATA_FILE} (num_users), which {info.dataset_name} does not "
                          f"record; give the {what}")
    value, why = _first_that_holds(table, sequences, "sequences")
    return (dataclasses.replace(args, **{field_name: value}),
            f'[hstu] {field_name} "auto" -> {value:g}: {why}')


def resolve_dropout(network: NetworkArgs, info: Any) -> tuple[NetworkArgs, str | None]:
    """NetworkArgs with hidden_dropout="auto" resolved from the dataset's number of
    sequences (AUTO_DROPOUTS), and the line that says what was chosen and why; (network,
    None) when it is not "auto"."""
    return _by_sequences(network, "hidden_dropout", AUTO_DROPOUTS, info, "dropout")


AUTO_LEARNING_RATES = ((2000, 2e-3), (None, 4e-3))
"""OptimizerArgs.learning_rate="auto": (at most this many sequences in the dataset, peak
learning rate), the first that holds; the same limit as AUTO_DROPOUTS, for the same reason:
the number of epochs a 10-minute budget affords. Measured on validation inside the recipe's
budget (docs/results.md "Own data: the recipe that sizes itself"): 2e-3 is the rate tuned on
ML-100K (over 100 epochs in the budget); where the budget affords 10-20 epochs 4e-3 reached
the better validation NDCG@10 (ML-1M 0.1773 against 0.1721, seed 2; Instacart 0.1317 against
0.1295, seed 1), as 3e-3 did on ML-100K held to about 110 epochs (3 seeds)."""


def resolve_learning_rate(optimizer: Any, info: Any) -> tuple[Any, str | None]:
    """OptimizerArgs with learning_rate="auto" resolved from the dataset's number of
    sequences (AUTO_LEARNING_RATES), and the line that says what was chosen and why;
    (optimizer, None) when it is not "auto"."""
    return _by_sequences(optimizer, "learning_rate", AUTO_LEARNING_RATES, info, "learning rate")


AUTO_TEMPERATURES = ((5000, 0.1), (None, 0.07))
"""RetrievalArgs.temperature="auto": (at most this many items, softmax temperature on cosine
scores), the first that holds, as AUTO_WIDTHS. Measured on validation inside the recipe's
10-minute budget (docs/results.md "Own data: the recipe that sizes itself"): 0.1 is the
temperature tuned on ML-100K (1,682 items), and what ML-1M's runs (3,706) used; on 14,173
Instacart products 0.07 reached a better NDCG@10 than 0.1 (and than 0.05), the products rarely
bought gaining most. A larger catalogue needs a wider range of logits (1 / temperature) for
the softmax to single an item out of it. Between 3,706 and 14,173 items the limit is not
measured."""


def resolve_temperature(retrieval: RetrievalArgs | None, num_items: int, first_item_id: int
                        ) -> tuple[RetrievalArgs | None, str | None]:
    """RetrievalArgs with temperature="auto" resolved from a catalogue of ids [first_item_id,
    num_items) (AUTO_TEMPERATURES), and the line that says what was chosen and why;
    (retrieval, None) when it is not "auto"."""
    if retrieval is None or retrieval.temperature != AUTO:
        return retrieval, None
    value, why = _first_that_holds(AUTO_TEMPERATURES, num_items - first_item_id, "items")
    return (dataclasses.replace(retrieval, temperature=value),
            f'[hstu] temperature "auto" -> {value:g}: {why}')


AUTO_NEGATIVES = 1024
"""negative_sampling="auto" choosing a sampled softmax with num_negatives = -1: the uniform
draws per batch (besides the in-batch positives)."""


def resolve_sampling(
    retrieval: RetrievalArgs | None, num_items: int, first_item_id: int, dynamic: bool
) -> tuple[RetrievalArgs | None, str | None]:
    """RetrievalArgs with negative_sampling="auto" resolved for a catalogue of ids
    [first_item_id, num_items) (``dynamic``: the item table is a DynamicEmbeddingArgs), and
    the line that says what was chosen and why; (retrieval, None) when it is not "auto"."""
    if retrieval is None or retrieval.negative_sampling != AUTO:
        return retrieval, None
    items = num_items - first_item_id
    limit = retrieval.full_corpus_max_items
    drawn = retrieval.num_negatives if retrieval.num_negatives > 0 else AUTO_NEGATIVES
    if dynamic:
        choice, negatives = "sampled_live", drawn
        why = "the item table is dynamic (its rows are slots, not the catalogue)"
    elif items <= limit:
        choice, negatives = "full_corpus", -1
        why = f"the exact softmax: {items} items, at most full_corpus_max_items = {limit}"
    else:
        choice, negatives = "mixed_logq", drawn
        why = (f"{items} items, more than full_corpus_max_items = {limit}: in-batch plus "
               f"{negatives} uniform negatives a batch, logQ-corrected")
    try:
        resolved = dataclasses.replace(
            retrieval, negative_sampling=choice, num_negatives=negatives
        )
    except ConfigError as exc:
        raise ConfigError(
            exc.cls_name, exc.field_name,
            f'{exc.message} (negative_sampling "auto" chose {choice!r}: {why})',
        ) from None
    return resolved, f'[hstu] negative_sampling "auto" -> {choice!r}: {why}'


def describe_sizes(cfg: Any) -> str:
    """One line of the sizes a run will use (after resolve_sizes)."""
    if isinstance(cfg.dataset, BenchmarkDatasetArgs):
        return ""
    meta = read_metadata(cfg.dataset, cfg.extras)
    info = info_from_metadata(meta, cfg.dataset, cfg.task)
    tables = info.default_tables(overrides=cfg.tables)
    parts = [f"{t.table_name} {t.item_vocab_size_or_capacity}" for t in tables]
    text = f"sizes from {cfg.dataset.resolved_path}: tables " + ", ".join(parts)
    if cfg.ranking is not None:
        text += f"; ranking head {list(cfg.ranking.prediction_head_arch)}"
    return text


__all__ = [
    "AUTO_DROPOUTS",
    "AUTO_LEARNING_RATES",
    "AUTO_TEMPERATURES",
    "AUTO_WIDTHS",
    "action_kind",
    "describe_sizes",
    "info_from_metadata",
    "read_metadata",
    "resolve_dropout",
    "resolve_head",
    "resolve_learning_rate",
    "resolve_sizes",
    "resolve_temperature",
    "resolve_width",
    "select_contextual",
]
