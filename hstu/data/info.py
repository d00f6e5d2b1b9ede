"""DataInfo: the facts about a dataset that tables, model and trainer size themselves by.

Torch-free, so that the entry points can size tables from a preprocessed folder's
metadata before any process starts (:mod:`hstu.data.sizes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from hstu.args import AUTO, ConfigError, DynamicEmbeddingArgs, EmbeddingArgs

ITEM_TABLE = "item"
ACTION_TABLE = "action"


@dataclass
class DataInfo:
    """Facts about the dataset that the model and the trainer size themselves by.

    Item ids: ``num_items`` = max item id + 1 (the item table's rows). Preprocessed datasets
    use dense ids 1..num_items-1 (0 is never an item); custom data with a declared
    item_vocab_size and benchmark data use ids in [0, num_items).
    """

    dataset_name: str
    task: str
    num_items: int
    item_feature_name: str
    action_feature_name: str | None
    contextual_feature_names: list[str]
    contextual_vocab_sizes: dict[str, int]
    num_action_values: int | None
    """Action vocabulary (rating classes, 256 for the KuaiRand bitmask); None without actions."""
    max_seqlen: int
    """Max H + C of any sample: max_sequence_length + max_num_candidates (contextual not
    counted)."""
    num_train_samples: int
    num_eval_samples: int
    num_users: int = 0
    first_item_id: int = 1
    """Smallest id an item can have (1 for preprocessed datasets, 0 otherwise)."""
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    users_without_train_sample: int = 0
    """Users of the dataset that give no training sample (too few interactions before their
    evaluation items); they are still evaluated when they have an evaluation sample."""
    num_eval_items: int = 0
    """Evaluation targets (retrieval) or candidates (ranking)."""
    tied_eval_items: int = 0
    """Evaluation targets / candidates whose timestamp equals the last history item's: their
    order at the split is the raw file's, not time's."""
    cold_items: int = 0
    """DatasetArgs.cold_items: the items held out of training (0 without the option)."""
    cold_events_dropped: int = 0
    """... and the events of theirs dropped from the training sequences."""

    def default_tables(
        self,
        overrides: list[EmbeddingArgs] | None = None,
        item_sharding: Literal["data_parallel", "model_parallel"] = "model_parallel",
        contextual_sharding: Literal["data_parallel", "model_parallel"] = "data_parallel",
    ) -> list[EmbeddingArgs]:
        """The dataset's predefined tables: ``item`` (item feature), ``action`` (when there
        is one), then one table per contextual feature named after it (``user_id`` model
        parallel like the item table). A table in `overrides` with the same table_name
        replaces the default (it must keep rows >= the data's vocabulary unless dynamic);
        overrides with new names are appended.
        """
        tables: list[EmbeddingArgs] = [
            EmbeddingArgs([self.item_feature_name], ITEM_TABLE, self.num_items, item_sharding)
        ]
        if self.action_feature_name is not None and self.num_action_values:
            tables.append(
                EmbeddingArgs(
                    [self.action_feature_name],
                    ACTION_TABLE,
                    self.num_action_values,
                    "data_parallel",
                )
            )
        for name in self.contextual_feature_names:
            sharding = item_sharding if name == "user_id" else contextual_sharding
            tables.append(EmbeddingArgs([name], name, self.contextual_vocab_sizes[name], sharding))
        by_name = {t.table_name: t for t in overrides or []}
        out = []
        for t in tables:
            o = by_name.pop(t.table_name, None)
            if o is None:
                out.append(t)
                continue
            if o.item_vocab_size_or_capacity == AUTO:
                o = replace(o, item_vocab_size_or_capacity=t.item_vocab_size_or_capacity)
            elif (
                not isinstance(o, DynamicEmbeddingArgs)
                and o.item_vocab_size_or_capacity < t.item_vocab_size_or_capacity
            ):
                raise ConfigError(
                    type(o).__name__,
                    "item_vocab_size_or_capacity",
                    f"table {o.table_name!r} has {o.item_vocab_size_or_capacity} rows but dataset "
                    f"{self.dataset_name} needs {t.item_vocab_size_or_capacity} (max id + 1); "
                    'set it to "auto" (the size of the data) or at least that',
                )
            out.append(o)
        for o in by_name.values():
            if o.item_vocab_size_or_capacity == AUTO:
                raise ConfigError(
                    type(o).__name__,
                    "item_vocab_size_or_capacity",
                    f'"auto" sizes a table from the data, but table {o.table_name!r} is none of '
                    f"the dataset's tables {[t.table_name for t in tables]}; give its size",
                )
        return out + list(by_name.values())


__all__ = ["ACTION_TABLE", "ITEM_TABLE", "DataInfo"]
