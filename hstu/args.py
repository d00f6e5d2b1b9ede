"""Every gin-configurable argument class of the trainer, and the HBM plan.

Checks that span fields, classes or the data live in :mod:`hstu.checks`.

Each class is a ``@gin.configurable`` dataclass. Required fields default to ``REQUIRED``
and are checked in ``__post_init__`` together with types, choices and ranges, with the
framework of :mod:`hstu.validation` (also used by the preprocessor's classes in
``hstu.data.data_args``); a problem raises :class:`ConfigError` naming the class and the
field (the loader in ``hstu.config`` adds the gin file and line). Every field carries a
docstring right under it (wrapped at the line limit; its lines are joined);
:func:`field_docs` reads them back for the generated reference (``docs/gin_reference.md``).
Names of the framework stay importable from here.

This module knows nothing of torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import gin

from hstu.checks import check_tables
from hstu.registry import (
    ATTENTION_BACKENDS,
    DATASETS,
    NEGATIVE_SAMPLING,
    parse_retrieval_metric,
    retrieval_metric_names,
)
from hstu.validation import (  # noqa: F401 - re-exported: hstu.args is the public home
    AUTO,
    REQUIRED,
    ConfigError,
    _check_type,
    _non_negative,
    _positive,
    _require,
    _type_name,
    _validate_fields,
    did_you_mean,
    field_docs,
    field_specs,
)

FLOAT32_MAX = 3.4028234663852886e38


def _float32(obj: Any, *names: str) -> None:
    """Values the optimizers compute with in float32 must be finite there."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _require(
                math.isfinite(value) and abs(value) <= FLOAT32_MAX,
                obj,
                name,
                f"{value!r} is not a finite float32 (largest {FLOAT32_MAX:.4g}): training would "
                "overflow at step 1",
            )


def _some_features(obj: Any) -> None:
    """A table or feature group names at least one feature."""
    _require(len(obj.feature_names) > 0, obj, "feature_names", "must name at least one feature")


RANKING_METRICS = ("AUC",)


STREAM_DATASET = "stream"
"""DatasetArgs.dataset_name of online training without a preprocessed dataset: the sizes come
from StreamArgs (item_capacity, rating_classes), the events from the stream."""


# ------------------------------------------------------------------------------ classes


@gin.configurable
@dataclass
class TrainerArgs:
    """How long to train, when to evaluate, log, profile and checkpoint."""

    train_batch_size: int = REQUIRED
    """Samples per data-parallel rank per training step."""
    eval_batch_size: int = REQUIRED
    """Samples per data-parallel rank per evaluation step."""
    eval_interval: int = 100
    """Run evaluation every this many training steps (and at the end)."""
    log_interval: int = 100
    """Log loss, lr, tokens/s and TFLOP/s every this many training steps."""
    max_train_iters: int | None = None
    """Number of training steps; None trains one epoch (or max_train_epochs)."""
    max_train_epochs: float | None = None
    """Training length in epochs of the training split (e.g. 200, or 2.5), turned into steps
    once the data is loaded (ceil(epochs x steps an epoch), the run's first lines say how
    many); the learning-rate schedule ends there. With early_stopping_patience the run may end
    sooner. Cannot be set with max_train_iters."""
    eval_interval_epochs: float | None = None
    """Evaluate every this fraction (or multiple) of an epoch, e.g. 0.5, instead of every
    eval_interval steps (rounded to whole steps, at least 1): evaluations follow the data's
    size, not a step count tuned on another data set."""
    time_budget_minutes: float | None = None
    """Wall-clock minutes the run may take from the trainer's start (building the model and
    loaders, training, evaluations, the test split); None: no budget. At the first evaluation
    the run measures its own seconds a step and an evaluation and lowers the step count
    (max_train_iters, or one epoch) to what fits, so that the learning-rate schedule ends at
    the last step it can afford; one line says what it chose and why. It never raises the step
    count; a resumed run keeps the count chosen before."""
    max_eval_iters: int | None = None
    """Evaluation batches per evaluation; None evaluates the whole split."""
    seed: int = 1234
    """Seed for model init, data order and sampling."""
    dropout_per_rank: bool = True
    """Several data-parallel ranks: each draws its own dropout masks (streams seeded from seed and
    its DP rank), as one process does over a batch as large as the global one; False: every DP rank
    draws the same masks (docs/training.md, "Gradient semantics")."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (dense and tables), updated after every step with
    this decay (e.g. 0.99; warmed up as min(decay, (1 + t) / (10 + t))); evaluation, the best
    checkpoint, the test split and export (of any checkpoint of the run) use the average, training
    continues from the raw weights. 0 disables it. One more float32 copy of the weights in
    memory."""
    profile: bool = False
    """Record a torch.profiler trace between profile_step_start and profile_step_end."""
    profile_step_start: int = 100
    """First training step of the profiler window."""
    profile_step_end: int = 200
    """Training step at which the profiler window ends (exclusive)."""
    ckpt_save_interval: int = -1
    """Save a checkpoint every this many steps; -1 disables saving."""
    ckpt_save_dir: str | None = None
    """Directory checkpoints are written to; None: ./checkpoints, or <run_dir>/checkpoints for an
    online run (a stream run owns its checkpoints)."""
    ckpt_load_dir: str = ""
    """Checkpoint to resume from: "auto" (the newest complete checkpoint under ckpt_save_dir; fresh
    start if none), a checkpoint folder, or a root (its newest complete checkpoint); empty starts
    fresh."""
    keep_last_n: int | None = 3
    """Keep this many newest checkpoints in ckpt_save_dir, deleting older ones after each save; None
    keeps all."""
    pipeline_type: Literal["none", "native", "prefetch"] = "native"
    """Train pipeline: none (sequential), native (TrainPipelineSparseDist) or prefetch."""
    ddp_bucket_cap_mb: float = 25.0
    """Bucket size (MiB) of the dense data-parallel gradient all-reduce; buckets are launched during
    backward as they fill."""
    run_dir: str | None = None
    """Run directory for logs, metrics.csv, TensorBoard and traces; None:
    ./runs/<task>-<timestamp>."""
    best_metric: str | None = None
    """Eval metric (higher is better, e.g. NDCG@10) selecting the best checkpoint on the validation
    split; the test split is then scored once with it. Needs DatasetArgs.holdout_validation."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a new best best_metric; None never stops early."""
    best_within_stderr: float = 0.0
    """Select the latest evaluation whose best_metric is within this many standard errors of the
    highest so far (the one-standard-error rule at 1.0: a later checkpoint that validation cannot
    tell apart from the best replaces it; the standard error is the highest evaluation's, over
    the validation users); early_stopping_patience then counts the evaluations below that. 0
    selects the highest value only. Needs best_metric."""
    best_requires_loss_below_prior: bool = False
    """Ranking: only an evaluation whose validation loss is below the label prior's (a constant
    score from the training labels, on the same validation candidates) may become the best
    checkpoint; until one does, the selection is the evaluation with the lowest validation loss, and
    the log says so. Needs best_metric."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _positive(
            self, "train_batch_size", "eval_batch_size", "eval_interval", "log_interval",
            "ddp_bucket_cap_mb",
        )
        if self.max_train_iters is not None:
            _require(
                self.max_train_iters >= 1,
                self,
                "max_train_iters",
                f"must be >= 1 (or None for one epoch), got {self.max_train_iters}",
            )
        _positive(self, "max_eval_iters", "time_budget_minutes", "max_train_epochs",
                  "eval_interval_epochs")
        _require(
            self.max_train_epochs is None or self.max_train_iters is None,
            self,
            "max_train_epochs",
            f"cannot be set with max_train_iters ({self.max_train_iters}): one length, in "
            "epochs or in steps",
        )
        _non_negative(self, "profile_step_start")
        _require(
            0.0 <= self.ema_decay < 1.0, self, "ema_decay",
            f"must be in [0, 1) (0 disables the average), got {self.ema_decay}",
        )
        _require(
            self.profile_step_end > self.profile_step_start,
            self,
            "profile_step_end",
            f"must be > profile_step_start ({self.profile_step_start}), "
            f"got {self.profile_step_end}",
        )
        _positive(self, "early_stopping_patience")
        _require(
            self.early_stopping_patience is None or self.best_metric is not None,
            self,
            "early_stopping_patience",
            "needs TrainerArgs.best_metric (the metric it watches)",
        )
        _require(
            self.best_within_stderr >= 0, self, "best_within_stderr",
            f"must be >= 0 (standard errors below the highest value), got "
            f"{self.best_within_stderr}",
        )
        _require(
            self.best_within_stderr == 0 or self.best_metric is not None,
            self,
            "best_within_stderr",
            "needs TrainerArgs.best_metric (the metric whose standard error it counts)",
        )
        _require(
            not self.best_requires_loss_below_prior or self.best_metric is not None,
            self,
            "best_requires_loss_below_prior",
            "needs TrainerArgs.best_metric (it restricts which evaluations that metric selects "
            "from)",
        )
        _positive(self, "keep_last_n")
        _require(
            self.ckpt_save_interval == -1 or self.ckpt_save_interval > 0,
            self,
            "ckpt_save_interval",
            f"must be -1 (off) or > 0, got {self.ckpt_save_interval}",
        )


@gin.configurable
@dataclass
class EmbeddingArgs:
    """A static embedding table (TorchRec EmbeddingCollection)."""

    feature_names: list[str] = REQUIRED
    """Features that look up this table."""
    table_name: str = REQUIRED
    """Unique table name."""
    item_vocab_size_or_capacity: int | Literal["auto"] = "auto"
    """Rows of the table (ids must be < this); "auto" (or left out): the size the preprocessed
    dataset needs, read from its metadata before any process starts."""
    sharding_type: Literal["data_parallel", "model_parallel"] = REQUIRED
    """data_parallel replicates the table; model_parallel lets TorchRec shard it."""
    sharding_override: Literal[
        "auto", "row_wise", "table_wise", "column_wise", "table_row_wise"
    ] = "auto"
    """Force TorchRec's sharding of a model_parallel table; auto lets the planner choose."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _some_features(self)
        _require(self.table_name != "", self, "table_name", "must not be empty")
        if self.item_vocab_size_or_capacity != AUTO:
            _positive(self, "item_vocab_size_or_capacity")
        _require(
            self.sharding_override == "auto" or self.sharding_type != "data_parallel",
            self,
            "sharding_override",
            f"{self.sharding_override!r} needs sharding_type='model_parallel' (data_parallel "
            "tables are replicated)",
        )


@dataclass(frozen=True)
class HbmPlan:
    """How much accelerator memory a dynamic table's values take, and why."""

    rule: str
    """Which rule decided: global_hbm_for_values | item_vocab_gpu_capacity |
    item_vocab_gpu_capacity_ratio | full_table."""
    capacity_rows: int
    """Rows held in accelerator memory."""
    row_bytes: int
    """Bytes per row: embedding values plus optimizer state."""
    hbm_bytes: int
    """capacity_rows x row_bytes."""

    def describe(self, table_name: str) -> str:
        return (
            f"table {table_name}: {self.capacity_rows} rows x {self.row_bytes} B/row = "
            f"{self.hbm_bytes / 2**20:.2f} MiB (rule: {self.rule})"
        )


# Extra per-row optimizer state, in rows of `dim` values (Adam: m and v) or single values.
_OPTIMIZER_STATE = {
    "sgd": (0, 0),
    "adam": (2, 0),
    "adamw": (2, 0),
    "rowwise_adagrad": (0, 1),
}


def embedding_row_bytes(embedding_dim: int, optimizer_str: str, bytes_per_value: int = 4) -> int:
    """Bytes one row of a table occupies with its optimizer state (docs/embeddings.md)."""
    if optimizer_str not in _OPTIMIZER_STATE:
        raise ValueError(
            f"optimizer {optimizer_str!r} has no known state size; "
            f"one of {sorted(_OPTIMIZER_STATE)}"
        )
    extra_rows, extra_values = _OPTIMIZER_STATE[optimizer_str]
    return (embedding_dim * (1 + extra_rows) + extra_values) * bytes_per_value


@gin.configurable
@dataclass
class DynamicEmbeddingArgs(EmbeddingArgs):
    """A dynamic table: raw int64 ids mapped into a fixed capacity with LRU/LFU eviction."""

    sharding_type: Literal["data_parallel", "model_parallel"] = "model_parallel"
    """Always model_parallel for dynamic tables (forced)."""
    global_hbm_for_values: int | None = None
    """Bytes of accelerator memory for values + optimizer state; wins over the two below."""
    item_vocab_gpu_capacity: int | None = None
    """Rows kept in accelerator memory; used when global_hbm_for_values is None."""
    item_vocab_gpu_capacity_ratio: float | None = None
    """Fraction of item_vocab_size_or_capacity kept in accelerator memory; lowest precedence."""
    evict_strategy: Literal["lru", "lfu"] = "lru"
    """Eviction policy when the table is full: least recently or least frequently used."""
    caching: bool = False
    """On GPU, keep a device cache of global_hbm_for_values bytes in front of host memory."""
    admit_min_count: int = 1
    """Admission: an id gets a row only once training has looked it up this many times (counted
    in a count-min sketch, occurrences over all ranks); before that its lookups are misses (a
    zero embedding, no row, counted as not admitted). 1: every id gets a row in the step it is
    first looked up. Above 1, one row of the table is kept for the misses (never an id's)."""
    admit_sketch_width: int = 1 << 20
    """Admission (admit_min_count > 1): counters per row of the count-min sketch. It takes
    width x depth x 4 bytes on every rank; every width occurrences counted, all counters are
    halved, so an id must come back within about that many occurrences of not admitted ids."""
    admit_sketch_depth: int = 4
    """Admission: rows (independent hashes) of the count-min sketch; an estimate is the smallest
    of its counters, never below the true count."""

    def __post_init__(self) -> None:
        if self.sharding_type != "model_parallel" and self.sharding_type is not REQUIRED:
            raise ConfigError(
                type(self).__name__,
                "sharding_type",
                f"dynamic tables are always model_parallel, got {self.sharding_type!r}",
            )
        self.sharding_type = "model_parallel"
        super().__post_init__()
        _positive(self, "global_hbm_for_values", "item_vocab_gpu_capacity")
        _require(self.admit_min_count >= 1, self, "admit_min_count",
                 f"must be >= 1 (1: no admission), got {self.admit_min_count}")
        _positive(self, "admit_sketch_width")
        _require(1 <= self.admit_sketch_depth <= 16, self, "admit_sketch_depth",
                 f"must be in [1, 16], got {self.admit_sketch_depth}")
        if self.item_vocab_gpu_capacity_ratio is not None:
            _require(
                0.0 < self.item_vocab_gpu_capacity_ratio <= 1.0,
                self,
                "item_vocab_gpu_capacity_ratio",
                f"must be in (0, 1], got {self.item_vocab_gpu_capacity_ratio}",
            )

    @property
    def admission_sketch_bytes(self) -> int:
        """Host bytes of the admission sketch on every rank (0 without admission)."""
        if self.admit_min_count <= 1:
            return 0
        return self.admit_sketch_width * self.admit_sketch_depth * 4

    def resolve_hbm(
        self, embedding_dim: int, optimizer_str: str, bytes_per_value: int = 4
    ) -> HbmPlan:
        """Applies the precedence global_hbm_for_values > item_vocab_gpu_capacity > ratio.

        With neither set, the whole table (item_vocab_size_or_capacity rows) is planned.
        Capacity never exceeds item_vocab_size_or_capacity.
        """
        row_bytes = embedding_row_bytes(embedding_dim, optimizer_str, bytes_per_value)
        vocab = self.item_vocab_size_or_capacity
        if vocab == AUTO:
            raise ConfigError(
                type(self).__name__,
                "item_vocab_size_or_capacity",
                f'table {self.table_name!r}: "auto" is resolved from the dataset before planning',
            )
        if self.global_hbm_for_values is not None:
            rule = "global_hbm_for_values"
            capacity = min(vocab, self.global_hbm_for_values // row_bytes)
            if capacity < 1:
                raise ConfigError(
                    type(self).__name__,
                    "global_hbm_for_values",
                    f"{self.global_hbm_for_values} bytes hold no row of {row_bytes} bytes "
                    f"(dim {embedding_dim}, optimizer {optimizer_str})",
                )
            return HbmPlan(rule, capacity, row_bytes, self.global_hbm_for_values)
        if self.item_vocab_gpu_capacity is not None:
            rule, capacity = "item_vocab_gpu_capacity", min(vocab, self.item_vocab_gpu_capacity)
        elif self.item_vocab_gpu_capacity_ratio is not None:
            rule = "item_vocab_gpu_capacity_ratio"
            capacity = max(1, math.floor(self.item_vocab_gpu_capacity_ratio * vocab))
        else:
            rule, capacity = "full_table", vocab
        return HbmPlan(rule, capacity, row_bytes, capacity * row_bytes)


@gin.configurable
@dataclass
class DatasetArgs:
    """A preprocessed dataset read from dataset_path."""

    dataset_name: str = REQUIRED
    """One of ml-1m, ml-20m, ml-100k, kuairand-pure, kuairand-1k, kuairand-27k, synthetic, custom,
    or the --name of your own preprocessed data (a folder tmp_data/<name>, or dataset_path)."""
    max_sequence_length: int = REQUIRED
    """Most recent history items fed to the model per sample."""
    dataset_path: str | None = None
    """Folder the preprocessor wrote; None means tmp_data/<dataset_name>."""
    max_num_candidates: int = 0
    """Candidates per sample (ranking); 0 for retrieval."""
    shuffle: bool = False
    """Shuffle training samples every epoch (deterministic for a seed)."""
    holdout_validation: bool = False
    """Also hold out a validation target per user, for selection: retrieval, the second-to-last item
    (train without the last two); ranking, the max_num_candidates interactions before the test
    candidates (training candidates come from before those)."""
    train_full_history: bool = False
    """Retrieval: train on the whole history of users with more than max_sequence_length items (cut
    into windows of max_sequence_length overlapping by one item, each a sample every epoch); False
    trains on the most recent window only."""
    eval_split: Literal["valid", "test"] = "test"
    """Which held-out item evaluation ranks; valid needs holdout_validation."""
    cold_items: float = 0.0
    """Retrieval: the share of the catalogue's items held out of training (0 = none): their events
    are dropped from every user's sequence except the held-out ones (test, and validation with
    holdout_validation), so no training sample holds them; evaluation adds cold/<metric>, the
    metrics over the targets that are cold items (docs/data.md "Cold items")."""
    cold_items_seed: int = 0
    """Which items cold_items draws (the same set for every model and TrainerArgs.seed)."""
    action_tokens: bool = True
    """Interleave each history item's action as a token; False feeds item tokens only (ranking
    labels still come from actions)."""
    contextual_features: list[str] | None = None
    """Contextual features fed as leading tokens; None uses every one the dataset has, [] none."""
    balance_ranks: bool = False
    """Training with several data-parallel ranks: split each global batch over the ranks by tokens
    (longest first, each to the least-loaded rank with room; every rank keeps batch_size samples)
    instead of every world_size-th sample. Same global batches and loss; a step waits less for the
    slowest rank."""
    balance_ranks_by: Literal["tokens", "attention"] = "tokens"
    """What balance_ranks equalises across the ranks: tokens (sum of sequence lengths) or attention
    (sum of squared sequence lengths in tokens, contextual and action tokens included: the attention
    FLOPs; with stochastic_length_alpha this is ULTRA-HSTU's load-balanced stochastic length)."""
    stochastic_length_alpha: float = 0.0
    """Stochastic length (HSTU paper §3.2), training only: 0 = off; alpha in (1, 2] keeps a history
    of n items (n after the cut to max_sequence_length N) whole when n <= N^(alpha/2), else whole
    with probability N^alpha / n^2 and otherwise shortened to floor(N^(alpha/2)) items, so the
    expected attention cost is O(N^alpha). Decided per (seed, epoch, sample), the same for any
    number of ranks; evaluation always sees full histories; ranking candidates are never dropped."""
    stochastic_length_sampling: Literal["recency", "uniform", "mix"] = "recency"
    """How stochastic length shortens a history: recency keeps the most recent items, uniform an
    order-preserving uniformly drawn subset, mix either one per sample (uniform with probability
    stochastic_length_mix_prob)."""
    stochastic_length_mix_prob: float = 0.5
    """stochastic_length_sampling = mix: the probability that a shortened sample takes the uniform
    subset (else the most recent items)."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _require(
            self.stochastic_length_alpha == 0.0 or 1.0 < self.stochastic_length_alpha <= 2.0,
            self,
            "stochastic_length_alpha",
            f"must be 0 (off) or in (1, 2], got {self.stochastic_length_alpha}",
        )
        _require(
            0.0 <= self.stochastic_length_mix_prob <= 1.0,
            self,
            "stochastic_length_mix_prob",
            f"must be in [0, 1], got {self.stochastic_length_mix_prob}",
        )
        _require(
            self.eval_split == "test" or self.holdout_validation,
            self,
            "eval_split",
            "'valid' needs DatasetArgs.holdout_validation = True",
        )
        _require(
            self.dataset_name in DATASETS or self.dataset_name == STREAM_DATASET
            or os.path.isdir(self.resolved_path),
            self,
            "dataset_name",
            f"{self.dataset_name!r} is not one of {', '.join(DATASETS.names())}, "
            f"{STREAM_DATASET!r} (online training without a preprocessed dataset)"
            + did_you_mean(self.dataset_name, DATASETS.names())
            + f", nor preprocessed data in {self.resolved_path} (python -m hstu.data.preprocess "
            f"--dataset custom --raw FILE --name {self.dataset_name})",
        )
        _positive(self, "max_sequence_length")
        _non_negative(self, "max_num_candidates")
        _require(0.0 <= self.cold_items < 1.0, self, "cold_items",
                 f"must be in [0, 1) (a share of the items), got {self.cold_items}")

    @property
    def resolved_path(self) -> str:
        return self.dataset_path or f"tmp_data/{self.dataset_name}"


DISTRIBUTIONS = ("uniform", "normal", "zipf", "lognormal")


@gin.configurable
@dataclass
class FeatureArgs:
    """Synthetic features for benchmarks: how long the sequences are and which ids they hold."""

    feature_names: list[str] = REQUIRED
    """Features generated with these settings."""
    max_sequence_length: int = REQUIRED
    """Longest sequence per sample (1 for a scalar feature)."""
    is_jagged: bool = False
    """Lengths vary per sample (drawn from length_distribution) instead of all
    max_sequence_length."""
    length_distribution: Literal["uniform", "normal", "zipf", "lognormal"] = "uniform"
    """Distribution of jagged lengths in [1, max_sequence_length]."""
    length_alpha: float = 1.2
    """Shape: zipf exponent, normal/lognormal sigma relative to max_sequence_length."""
    value_distribution: Literal["uniform", "normal", "zipf", "lognormal"] = "uniform"
    """Distribution of ids over the table's vocabulary."""
    value_alpha: float = 1.2
    """Shape of the id distribution (zipf exponent, sigma)."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _some_features(self)
        _positive(self, "max_sequence_length", "length_alpha", "value_alpha")


@gin.configurable
@dataclass
class BenchmarkDatasetArgs:
    """In-memory random batches for speed benchmarks (no files)."""

    feature_args: list[FeatureArgs] = REQUIRED
    """The generated features, e.g. [@item/FeatureArgs(), @context/FeatureArgs()]."""
    embedding_args: list[EmbeddingArgs] = REQUIRED
    """The tables those features look up."""
    item_feature_name: str = REQUIRED
    """Feature holding the item sequence."""
    contextual_feature_names: list[str] = REQUIRED
    """Features placed as contextual tokens in front of the sequence."""
    action_feature_name: str | None = None
    """Feature holding actions (interleaved with items); None for none."""
    max_num_candidates: int = 0
    """Candidates per sample (ranking)."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _non_negative(self, "max_num_candidates")
        for table in self.embedding_args:
            _require(
                table.item_vocab_size_or_capacity != AUTO,
                self,
                "embedding_args",
                f'table {table.table_name!r} is "auto", but benchmark data has no dataset to '
                "size it from; give item_vocab_size_or_capacity",
            )
        generated = {n for fa in self.feature_args for n in fa.feature_names}
        tabled = {n for ea in self.embedding_args for n in ea.feature_names}
        for name_field, names in (
            ("item_feature_name", [self.item_feature_name]),
            ("contextual_feature_names", self.contextual_feature_names),
            ("action_feature_name", [self.action_feature_name] if self.action_feature_name else []),
        ):
            for name in names:
                _require(
                    name in generated,
                    self,
                    name_field,
                    f"feature {name!r} is not generated by any FeatureArgs"
                    + did_you_mean(name, sorted(generated)),
                )
                _require(
                    name in tabled,
                    self,
                    name_field,
                    f"feature {name!r} is not looked up by any EmbeddingArgs"
                    + did_you_mean(name, sorted(tabled)),
                )
        check_tables(self.embedding_args)


@gin.configurable
@dataclass
class NetworkArgs:
    """The HSTU block: depth, width, heads, kernels and precision."""

    num_layers: int = REQUIRED
    """Number of HSTU layers."""
    hidden_size: int | Literal["auto"] = REQUIRED
    """Model width D; "auto" (retrieval) from the catalogue: 50 up to 5,000 items, 128 above
    (hstu.data.sizes.resolve_width; one line of the run's log says which)."""
    num_attention_heads: int = REQUIRED
    """Attention heads H (split over the tensor-parallel group)."""
    kv_channels: int | Literal["auto"] = REQUIRED
    """Per-head width d of Q, K, V and U; "auto": hidden_size (the width "auto" chooses, where
    hidden_size is "auto")."""
    hidden_dropout: float | Literal["auto"] = 0.2
    """Dropout on the layer output (and on the input embeddings); "auto" from the data's number
    of sequences: 0.5 up to 2,000, 0.2 above (hstu.data.sizes.resolve_dropout; one line of
    the run's log says which)."""
    norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    is_causal: bool = True
    """Causal attention over the history; False (bidirectional) is refused for retrieval and for
    ranking with history_loss_weight > 0, where a token would see its own label."""
    mask_convention: Literal["hstu", "peer"] = "hstu"
    """Attention mask: "hstu" (contextual tokens see the contextual block only; history never sees
    candidates) or "peer" (as Meta's generative-recommenders and NVIDIA's recsys-examples:
    contextual tokens see the whole non-candidate history, and with is_causal=False history sees the
    candidates). docs/model.md, "Mask conventions"."""
    dtype_str: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Compute dtype of the HSTU block; float32 for CPU runs."""
    kernel_backend: Literal[ATTENTION_BACKENDS.names()] = "cutlass"  # hstu.registry
    """Attention kernel; falls back (with a one-line message) where it cannot run."""
    target_group_size: int = 1
    """Candidates per target group (candidates see their own group only)."""
    num_position_buckets: int = 8192
    """Rows of the learned position embedding."""
    recompute_input_layernorm: bool = False
    """Recompute the input LayerNorm in backward instead of storing it."""
    recompute_input_silu: bool = False
    """Recompute SiLU(n W_uvqk) in backward instead of storing it."""
    item_embedding_dim: int = -1
    """Item table dim; -1 uses hidden_size. Below hidden_size the items are projected up into
    the tokens, and (retrieval) the queries are projected down to it for scoring."""
    contextual_embedding_dim: int = -1
    """Contextual table dim; -1 uses hidden_size."""
    relative_attention_bias: bool = False
    """Add a relative attention bias per layer (position + log-bucketed time), shared by heads."""
    rab_use_time: bool = True
    """Include the log-bucketed time-distance term in the relative attention bias."""
    rab_query_time: bool = False
    """Retrieval: the last token's time bucket measures from the query's time (training and offline
    evaluation: the target's timestamp; serving: the request time) instead of from its own timestamp
    (docs/model.md). Needs relative_attention_bias, rab_use_time and DatasetArgs.action_tokens =
    False."""
    attention_alpha: float | None = None
    """Scale on Q K^T; None uses 1/sqrt(kv_channels) (the research model uses 1.0)."""
    attn_scaling_seqlen: int | None = None
    """N in SiLU(...)/N; None uses the longest token sequence of the data."""
    uvqk_bias: bool = True
    """Bias on the fused U/V/Q/K projection (the research model has none)."""
    norm_affine: bool = True
    """Learned scale and shift in the layer norms (the research model has none)."""
    output_bias: bool = False
    """Bias on the output projection W_o (the research model has one)."""
    use_position_embedding: bool = True
    """Add the learned absolute position embedding to the input tokens."""
    architecture: Literal["hstu", "sasrec", "hstu_sid", "mlp_baseline"] = "hstu"
    """hstu; sasrec (retrieval only): SASRec's causal softmax self-attention in place of the HSTU
    block (num_layers, hidden_size, num_attention_heads x kv_channels, hidden_dropout, norm_epsilon,
    num_position_buckets, use_position_embedding and the sasrec_* fields; docs/model.md "SASRec");
    hstu_sid (retrieval only): generative retrieval with semantic ids, items embedded from their
    codes (sid_codes) and the next item's codes decoded level by level by beam search
    (docs/model.md "Semantic ids"); or (ranking only) a non-sequential MLP over the user's
    contextual and the candidate's item embeddings, for comparison."""
    sid_codes: str | None = None
    """architecture="hstu_sid": the semantic ids of the dataset's items, a sid_codes.parquet file
    or its folder (python -m hstu.sid.tokenize; docs/semantic_ids.md), by raw item id."""
    sid_item_embedding: bool = False
    """architecture="hstu_sid": add each item's own id row to the sum of its code rows (an item
    never trained on then has an untrained part; False: items are their codes only)."""
    sid_decoder_layers: int = 1
    """architecture="hstu_sid": transformer layers of the code decoder (the head)."""
    sid_decoder_heads: int = 2
    """architecture="hstu_sid": attention heads of the code decoder (dividing hidden_size)."""
    sid_decoder_dropout: float | None = None
    """architecture="hstu_sid": dropout of the code decoder's attention and residual branches;
    None: hidden_dropout (the encoder's)."""
    sid_decoder_attention_dropout: float | None = None
    """architecture="hstu_sid": dropout of the code decoder's attention weights alone; None:
    sid_decoder_dropout's (0.0 keeps the residual branches' dropout and skips the attention's,
    the costlier one on CPU)."""
    sid_decoder_ffn_multiplier: int = 4
    """architecture="hstu_sid": the code decoder's feed-forward inner width as a multiple of
    hidden_size (its largest matrices: 2 runs it at about half the cost of 4)."""
    sasrec_ffn_activation: Literal["swiglu", "gelu", "relu"] = "swiglu"
    """architecture="sasrec": the feed-forward network, SwiGLU without biases (eSASRec's LiGR layer)
    or GELU / ReLU with biases (the original SASRec's ReLU)."""
    sasrec_ffn_multiplier: int = 4
    """architecture="sasrec": the feed-forward inner width as a multiple of hidden_size."""
    sasrec_gated_residual: bool = True
    """architecture="sasrec": each residual branch scaled by sigmoid(W x + b) of the layer's input
    (eSASRec's LiGR layer); False: plain residuals."""
    sequence_layout: Literal["jagged", "padded"] = "jagged"
    """jagged (each sample's real tokens only) or padded (every sample padded to the longest
    sequence the data allows, as padded trainers do; same results, for comparison; needs
    is_causal). HSTU and SASRec (SASRec's earlier published runs were padded)."""
    compile: bool = False
    """torch.compile each layer's output tail (LayerNorm(O) * U, dropout, W_o, residual; dynamic
    shapes); one TP rank only. Dropout masks then come from the compiled kernel's generator (results
    differ from eager by the masks)."""
    max_attn_len: int = 0
    """Semi-local attention: a history token sees at most this many earlier tokens (and, with
    is_causal=False, later ones); 0 is full attention. Meta's name; the rule (contextual tokens and
    candidates included) is hstu.ops.masks, docs/model.md "Long histories"."""
    min_full_attn_seq_len: int = 0
    """With max_attn_len > 0: the last this-many history tokens (and the candidates) still see the
    whole history; 0: none. Meta's name."""
    attn_truncation_layers: int = 0
    """Attention truncation: the first this-many layers run over the whole sequence, the layers
    above over each sample's last attn_truncation_len tokens only (the others keep their output of
    the last full layer); 0 is off, else 0 < value < num_layers. docs/model.md "Long histories"."""
    attn_truncation_len: int = 0
    """Tokens of each sample (its last ones) the layers above attn_truncation_layers run over; > 0
    with attn_truncation_layers, and at least the candidates of a ranking sample."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        if self.kv_channels == AUTO and self.hidden_size != AUTO:
            self.kv_channels = self.hidden_size
        _require(
            self.sequence_layout == "jagged" or self.is_causal,
            self,
            "sequence_layout",
            '"padded" needs is_causal=True (padding after the real tokens is then invisible to '
            "them)",
        )
        _positive(
            self, "num_layers", *(("hidden_size",) if self.hidden_size != AUTO else ()),
            "num_attention_heads", *(("kv_channels",) if self.kv_channels != AUTO else ()),
            "norm_epsilon", "target_group_size", "num_position_buckets", "sasrec_ffn_multiplier",
            "sid_decoder_layers", "sid_decoder_heads", "sid_decoder_ffn_multiplier",
        )
        _require(
            self.hidden_dropout == AUTO or 0.0 <= self.hidden_dropout < 1.0,
            self,
            "hidden_dropout",
            f"must be in [0, 1), got {self.hidden_dropout}",
        )
        _require(
            self.sid_decoder_dropout is None or 0.0 <= self.sid_decoder_dropout < 1.0,
            self,
            "sid_decoder_dropout",
            f"must be None or in [0, 1), got {self.sid_decoder_dropout}",
        )
        _require(
            self.sid_decoder_attention_dropout is None
            or 0.0 <= self.sid_decoder_attention_dropout < 1.0,
            self,
            "sid_decoder_attention_dropout",
            f"must be None or in [0, 1), got {self.sid_decoder_attention_dropout}",
        )
        _positive(self, "attention_alpha", "attn_scaling_seqlen")
        for name in ("item_embedding_dim", "contextual_embedding_dim"):
            value = getattr(self, name)
            _require(
                value == -1 or value > 0, self, name,
                f"must be -1 (hidden_size) or > 0, got {value}",
            )
        _non_negative(
            self, "max_attn_len", "min_full_attn_seq_len", "attn_truncation_layers",
            "attn_truncation_len",
        )
        if self.attn_truncation_layers > 0:
            _require(
                self.attn_truncation_layers < self.num_layers,
                self,
                "attn_truncation_layers",
                f"must be < num_layers ({self.num_layers}) so that some layers run truncated, "
                f"got {self.attn_truncation_layers}",
            )
            _require(
                self.attn_truncation_len > 0,
                self,
                "attn_truncation_len",
                f"must be > 0 with attn_truncation_layers={self.attn_truncation_layers} "
                "(the tokens the upper layers keep)",
            )

    @property
    def resolved_item_embedding_dim(self) -> int:
        return self.hidden_size if self.item_embedding_dim == -1 else self.item_embedding_dim

    @property
    def resolved_contextual_embedding_dim(self) -> int:
        dim = self.contextual_embedding_dim
        return self.hidden_size if dim == -1 else dim


@gin.configurable
@dataclass
class OptimizerArgs:
    """Dense and sparse optimizers, learning-rate schedule and clipping."""

    optimizer_str: Literal["adam", "adamw", "sgd"] = REQUIRED
    """Dense optimizer (the sparse one is the same family unless sparse_optimizer_str is set)."""
    learning_rate: float | Literal["auto"] = REQUIRED
    """Peak learning rate. "auto" (a retrieval or ranking run on a real dataset): chosen from the
    dataset's number of sequences, like NetworkArgs.hidden_dropout "auto" (hstu.data.sizes.
    AUTO_LEARNING_RATES; one line of the log says which)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled (adamw) or L2 (adam, sgd) weight decay of dense parameters."""
    sparse_optimizer_str: Literal["adam", "adamw", "sgd", "rowwise_adagrad"] | None = None
    """Sparse (embedding) optimizer fused into backward; None uses optimizer_str."""
    sparse_learning_rate: float | None = None
    """Sparse learning rate; None uses learning_rate."""
    sparse_adam_beta2: float | None = None
    """Adam beta2 of the embedding tables (adam / adamw sparse optimizers); None uses
    adam_beta2. A table row moves only when it is looked up, so a rare item's second moment
    sees few gradients: a longer average (0.999) can suit the tables while the dense weights
    keep a shorter one."""
    clip_grad_norm: float = 0.0
    """Clip the global norm of dense gradients to this; 0 disables clipping. Under tensor
    parallelism the norm is one over the model-parallel group (replicated parameters counted
    once)."""
    sparse_lr_schedule: Literal["follow", "constant"] = "follow"
    """follow: the warm-up and decay also scale the sparse (embedding) learning rate; constant: the
    sparse optimizers keep sparse_learning_rate throughout."""
    lr_warmup_iters: int = 0
    """Linear warm-up from 0 to learning_rate over this many steps."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, down to min_learning_rate at lr_decay_iters."""
    lr_decay_iters: int | None = None
    """Step at which decay ends; None uses max_train_iters."""
    min_learning_rate: float = 0.0
    """Floor of the decayed learning rate."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        lr = () if self.learning_rate == AUTO else ("learning_rate",)  # "auto": sizes.py
        _positive(self, *lr, "adam_eps", "sparse_learning_rate", "lr_decay_iters")
        _non_negative(
            self, "weight_decay", "clip_grad_norm", "lr_warmup_iters", "min_learning_rate"
        )
        _float32(self, *lr, "sparse_learning_rate", "min_learning_rate", "adam_eps",
                 "weight_decay", "clip_grad_norm")
        for name in ("adam_beta1", "adam_beta2", "sparse_adam_beta2"):
            value = getattr(self, name)
            if value is not None:
                _require(0.0 <= value < 1.0, self, name, f"must be in [0, 1), got {value}")
        if self.sparse_adam_beta2 is not None:
            _require(
                self.resolved_sparse_optimizer_str in ("adam", "adamw"), self,
                "sparse_adam_beta2",
                f"applies to Adam tables only; the sparse optimizer is "
                f"{self.resolved_sparse_optimizer_str!r}",
            )

    @property
    def resolved_sparse_optimizer_str(self) -> str:
        return self.sparse_optimizer_str or self.optimizer_str


@gin.configurable
@dataclass
class TensorModelParallelArgs:
    """Megatron-core tensor parallelism of the HSTU block."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each HSTU layer's heads; must divide the world size and the heads."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _positive(self, "tensor_model_parallel_size")


@gin.configurable
@dataclass
class RankingArgs:
    """Ranking head and loss."""

    prediction_head_arch: list[int | Literal["auto"]] = REQUIRED
    """Widths of the MLP head; the last is num_tasks (BCE per task) or the class count (CE). The
    last may be "auto": the dataset's action classes (CE), or num_tasks for bitmask actions
    (KuaiRand), resolved before any process starts."""
    prediction_head_act_type: Literal["relu", "gelu"] = "relu"
    """Activation between head layers."""
    prediction_head_bias: bool = True
    """Bias in the head's linear layers."""
    num_tasks: int = 1
    """Binary tasks decoded bit by bit from the action (when the last width equals it)."""
    eval_metrics: tuple[str, ...] = ("AUC",)
    """Evaluation metrics (per task where it applies)."""
    history_loss_weight: float = 0.0
    """Training only: add this times the same loss on every history item's token against its own
    action (causal, so the token never sees that action); needs action tokens. 0 trains on
    candidates only."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _require(
            self.history_loss_weight >= 0,
            self,
            "history_loss_weight",
            f"must be >= 0, got {self.history_loss_weight}",
        )
        _require(
            len(self.prediction_head_arch) > 0, self, "prediction_head_arch", "must not be empty"
        )
        for i, width in enumerate(self.prediction_head_arch):
            if width == AUTO:
                _require(
                    i == len(self.prediction_head_arch) - 1,
                    self,
                    "prediction_head_arch",
                    '"auto" can only be the last width (the one the data decides)',
                )
                continue
            _require(width > 0, self, "prediction_head_arch", f"widths must be > 0, got {width}")
        _positive(self, "num_tasks")
        for metric in self.eval_metrics:
            _require(
                metric in RANKING_METRICS,
                self,
                "eval_metrics",
                f"{metric!r} is not one of {', '.join(RANKING_METRICS)}"
                + did_you_mean(metric, RANKING_METRICS),
            )


@gin.configurable
@dataclass
class RetrievalArgs:
    """Retrieval loss (sampled softmax) and full-corpus evaluation."""

    num_negatives: int = -1
    """Negatives per positive; -1 uses the other items of the batch (in-batch)."""
    # the choices are hstu.registry.NEGATIVE_SAMPLING's names, read whenever the class is
    # checked or documented (a string annotation, evaluated by typing.get_type_hints)
    negative_sampling: Literal[(*NEGATIVE_SAMPLING.names(), "auto")] = "uniform"
    """uniform: num_negatives ids per query drawn uniformly from the corpus (-1: the other
    positives of the batch instead); in_batch: the other positives of the rank's batch
    (num_negatives must be -1); mixed: num_negatives uniform ids plus the in-batch positives;
    shared: num_negatives uniform ids drawn once per batch (per rank), every query scored
    against all of them (one [queries x num_negatives] matmul: the cost of a large catalogue
    without num_negatives lookups per query; no logQ correction, uniform draws need none);
    mixed_logq: the in-batch positives plus num_negatives uniform ids drawn once per batch (per
    rank), every query scored against all of them, with the logQ correction (the sampled
    softmax for catalogues too large for full_corpus); full_corpus: every item is a negative,
    the exact softmax (num_negatives must be -1; cost grows with the corpus; refused with a
    dynamic item table); sampled_live: for a dynamic item table (DynamicEmbeddingArgs), the
    in-batch positives plus num_negatives uniform draws per step over the table's live
    (occupied) rows, the same draws for every query and every rank, never admitted, with the
    logQ correction; auto: chosen from the data once it is known, and said in one line at
    start: full_corpus when the catalogue has at most full_corpus_max_items items, else
    mixed_logq with num_negatives draws (1024 where num_negatives is -1); over a dynamic item
    table, sampled_live (docs/model.md)."""
    full_corpus_max_items: int = 20_000
    """negative_sampling="auto": the largest catalogue (items) trained with the exact softmax;
    its cost grows with the catalogue (every item scored at every training position), the
    sampled one's with the batch."""
    temperature: float | Literal["auto"] = 0.05
    """Softmax temperature on cosine similarities; "auto": from the catalogue, 0.1 up to 5,000
    items, 0.07 above (hstu.data.sizes.AUTO_TEMPERATURES), said in one line at start."""
    full_corpus_matmul_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """With negative_sampling="full_corpus": the dtype of the training loss's three [queries x
    items] matmuls. "bfloat16" rounds their inputs to bfloat16 (float32 accumulation; the target's
    logit, the softmax and the loss stay float32): 3-4x faster matmuls on CPUs with AVX512-BF16/AMX
    and on GPUs (compute capability >= 8.0), gradients within ~0.4 %, but ~8x slower than float32 on
    CPUs without them (AVX2); "auto" picks bfloat16 where the device multiplies it natively and
    float32 elsewhere, and the run's first lines say which; evaluation is unaffected
    (docs/model.md)."""
    l2_norm_eps: float = 1e-6
    """Epsilon of the L2 normalisation of queries and items."""
    eval_metrics: tuple[str, ...] = ("HR@10", "NDCG@10")
    """Metrics: HR@K, NDCG@K (rank <= K, 1-based) and MRR."""
    eval_exclude_history: bool = True
    """Evaluation scores every item except those of the sample's input history (the MovieLens
    protocol: a target the user already had is unranked, scoring 0). False: the history stays
    rankable, for data where users come back to items (re-watches, re-purchases, the long-history
    synthetic set's recalls); the popularity baseline follows the same protocol."""

    exclude_history_from_loss: bool = False
    """With negative_sampling="full_corpus", "mixed_logq" or "sampled_live", training: each query's
    softmax leaves out the items of its own history (the items at its position and before,
    except its target), as evaluation with eval_exclude_history ranks them; False: every other
    item is a negative."""

    eval_num_users: int = 0
    """Evaluate on a fixed random subset of this many users of the split (the same users at every
    evaluation, chosen by TrainerArgs.seed), for catalogues or user counts where a full evaluation
    is too slow; the log says so and the metrics carry an eval_users field. 0: every user."""
    sid_beam_width: int = 50
    """NetworkArgs.architecture="hstu_sid": the beam of the decoding in evaluation and
    recommendation (prefixes kept per level; the last level keeps at least the top-k)."""
    sid_certify: bool = False
    """NetworkArgs.architecture="hstu_sid": search again, with a wider beam, every query whose
    best pruned prefix scores above its k-th item, so that the top-k is exact (docs/semantic_ids.md
    "Decoding"); costs more decoding where beams miss."""
    sid_new_item_spread: float = 0.0
    """NetworkArgs.architecture="hstu_sid": in decoding, this share of each code prefix's
    probability is spread evenly over the items below it at the last (collision) level, which the
    decoder learns from training targets only: an item never trained on (a new item with content
    codes, DatasetArgs.cold_items) can then be returned where its prefix is likely. 0: items as the
    decoder scores them (docs/semantic_ids.md "New items")."""
    sid_exclude_history_from_loss: bool = False
    """NetworkArgs.architecture="hstu_sid": each level's training softmax covers only the codes
    that lead to an item outside the query's history (its position and before, except its
    target), since evaluation never returns those items; decoding then renormalises each level
    over the codes it may take, the same distribution (docs/semantic_ids.md "History left out").
    False: every code of the level, and decoding scores as the decoder does."""
    eval_memory_mb: int = 256
    """Evaluation scores every rank's queries against its slice of the catalogue in blocks of items
    sized so that a block's [queries x items] work stays within this many MiB (the ranks' results
    merged exactly; the same ranks whatever the world size); a slice whose item vectors would exceed
    it is looked up block by block as it is scored instead of held whole (the same ranks)."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _require(self.eval_num_users >= 0, self, "eval_num_users",
                 f"must be >= 0 (0: every user), got {self.eval_num_users}")
        _positive(self, "eval_memory_mb", "sid_beam_width")
        _require(0.0 <= self.sid_new_item_spread <= 1.0, self, "sid_new_item_spread",
                 f"must lie in [0, 1], got {self.sid_new_item_spread}")
        _require(
            self.num_negatives == -1 or self.num_negatives > 0,
            self,
            "num_negatives",
            f"must be -1 (in-batch) or > 0, got {self.num_negatives}",
        )
        _positive(self, "full_corpus_max_items")
        if self.negative_sampling != AUTO:  # ("auto": checked once resolved, hstu.data.sizes)
            problem = NEGATIVE_SAMPLING[self.negative_sampling].num_negatives_problem(
                self.negative_sampling, self.num_negatives
            )
            _require(problem is None, self, "num_negatives", problem or "")
        _positive(self, *(() if self.temperature == AUTO else ("temperature",)), "l2_norm_eps")
        _require(
            not self.exclude_history_from_loss
            or self.negative_sampling in ("full_corpus", "sampled_live", "mixed_logq", AUTO),
            self,
            "exclude_history_from_loss",
            "applies to negative_sampling='full_corpus', 'mixed_logq' or 'sampled_live' only, got "
            f"{self.negative_sampling!r}",
        )
        _require(
            self.full_corpus_matmul_dtype in ("auto", "float32")
            or self.negative_sampling in ("full_corpus", AUTO),
            self,
            "full_corpus_matmul_dtype",
            f"applies to negative_sampling='full_corpus' only, got negative_sampling="
            f"{self.negative_sampling!r}",
        )
        for metric in self.eval_metrics:
            _require(
                parse_retrieval_metric(metric) is not None,
                self,
                "eval_metrics",
                f"{metric!r} is not {retrieval_metric_names()}",
            )


ARG_CLASSES: tuple[type, ...] = (
    TrainerArgs,
    EmbeddingArgs,
    DynamicEmbeddingArgs,
    DatasetArgs,
    FeatureArgs,
    BenchmarkDatasetArgs,
    NetworkArgs,
    OptimizerArgs,
    TensorModelParallelArgs,
    RankingArgs,
    RetrievalArgs,
)


__all__ = [
    "ARG_CLASSES",
    "AUTO",
    "DISTRIBUTIONS",
    "REQUIRED",
    "BenchmarkDatasetArgs",
    "ConfigError",
    "DatasetArgs",
    "DynamicEmbeddingArgs",
    "EmbeddingArgs",
    "FeatureArgs",
    "HbmPlan",
    "NetworkArgs",
    "OptimizerArgs",
    "RankingArgs",
    "RetrievalArgs",
    "TensorModelParallelArgs",
    "TrainerArgs",
    "did_you_mean",
    "embedding_row_bytes",
    "field_docs",
    "field_specs",
]

