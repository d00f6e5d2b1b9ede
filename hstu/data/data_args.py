"""Gin-configurable arguments of the data package: users' own data, the synthetic set, and
online training's stream (StreamArgs, docs/online.md).

Same style and framework (:mod:`hstu.validation`) as :mod:`hstu.args`: ``@gin.configurable``
dataclasses, a docstring under every field, validation in ``__post_init__`` raising
:class:`hstu.validation.ConfigError`. The preprocessor reads CustomDataArgs and SyntheticDataArgs
(``--gin-file`` / ``--gin-param``); training reads only the processed folder, so these never reach
the model. A run's gin file may bind StreamArgs (found in ``RunConfig.extras``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gin

from hstu.columns import EVENT_COLUMNS
from hstu.validation import (
    ConfigError,
    _non_negative,
    _positive,
    _require,
    _validate_fields,
)


@gin.configurable
@dataclass
class CustomDataArgs:
    """Users' own interaction log (CSV, TSV, parquet or JSON lines), one row per interaction."""

    path: str | None = None
    """CSV/TSV (.csv, .tsv, .txt), JSON-lines (.jsonl, .json, .ndjson) or parquet file (text
    optionally .gz), or a folder of such files read in name order; None takes the preprocessor's
    --raw."""
    user_column: str = EVENT_COLUMNS["user"][0]
    """Column holding the user id (any integer or string); left at the default, a column named user
    or userId is read too (hstu.columns)."""
    item_column: str = EVENT_COLUMNS["item"][0]
    """Column holding the item id (any integer or string unless item_vocab_size is set); left at the
    default, a column named item or movieId is read too."""
    timestamp_column: str = EVENT_COLUMNS["timestamp"][0]
    """Column holding the interaction time as an integer (unix seconds unless timestamp_unit says
    otherwise); left at the default, time or ts are read too."""
    timestamp_unit: str = "s"
    """Unit of the timestamp column: s or ms (stored as seconds, sorted at full precision)."""
    action_column: str | None = None
    """Column holding the action: a non-negative integer (rating class, bitmask; 4.0 counts as 4) or
    a number binned to classes (see action_bins); None for no action feature."""
    action_bins: list[float] | None = None
    """Bin edges for a numeric action: class = how many edges are <= the value (len + 1 classes).
    None: integers are their own class, and non-integer values (half stars) get one class per
    distinct value in ascending order (at most 256)."""
    num_action_values: int | None = None
    """Action vocabulary size; None uses max(action class) + 1."""
    contextual_columns: list[str] = field(default_factory=list)
    """Per-user columns used as contextual features (the value of the user's most recent row)."""
    item_vocab_size: int | None = None
    """Declared item vocabulary: ids are kept as-is and must be integers in [1, item_vocab_size);
    None remaps ids densely to 1..N."""
    delimiter: str | None = None
    """CSV field separator (one character); None: a tab for .tsv files, a comma otherwise."""
    has_header: bool = True
    """The CSV's first line names the columns; False names them by position (0, 1, ...)."""
    min_user_interactions: int = 2
    """Users with fewer interactions are dropped (counted in the statistics)."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _require(self.path != "", self, "path", "must not be empty")
        _require(
            self.timestamp_unit in ("s", "ms"),
            self,
            "timestamp_unit",
            f"must be 's' or 'ms', got {self.timestamp_unit!r}",
        )
        _require(
            self.delimiter is None or len(self.delimiter) == 1,
            self,
            "delimiter",
            f"must be one character, got {self.delimiter!r}",
        )
        _positive(self, "num_action_values", "min_user_interactions")
        if self.action_bins is not None:
            _require(len(self.action_bins) > 0, self, "action_bins", "must hold at least one edge")
            _require(
                all(a < b for a, b in zip(self.action_bins, self.action_bins[1:])),
                self,
                "action_bins",
                f"edges must increase, got {self.action_bins}",
            )
            _require(
                self.action_column is not None,
                self,
                "action_bins",
                "needs CustomDataArgs.action_column (the column it bins)",
            )
        if self.item_vocab_size is not None:
            _require(
                self.item_vocab_size > 1,
                self,
                "item_vocab_size",
                f"must be > 1, got {self.item_vocab_size}",
            )
        names = [self.user_column, self.item_column, self.timestamp_column]
        if self.action_column:
            names.append(self.action_column)
        names += self.contextual_columns
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(type(self).__name__, None, f"column(s) {sorted(dup)} mapped twice")


@gin.configurable
@dataclass
class SyntheticDataArgs:
    """A dataset with planted sequential structure: users walk a sparse Markov chain over items."""

    num_users: int = 2000
    """Users (one sequence each)."""
    num_items: int = 800
    """Distinct items (ids 1..num_items)."""
    num_segments: int = 4
    """Values of the 'segment' contextual feature; each segment follows its own successor lists."""
    out_degree: int = 3
    """Successors per item and segment (sparsity of the chain)."""
    noise_prob: float = 0.1
    """Chance that a step jumps to a random (popularity-weighted) item instead of following the
    chain."""
    min_length: int = 20
    """Shortest user sequence."""
    max_length: int = 120
    """Longest user sequence."""
    seed: int = 42
    """Seed: the same seed gives byte-identical output."""
    num_themes: int = 0
    """Long-range structure (docs/data.md "Synthetic long histories"): 0 = none; K > 0 gives each
    user one of K theme items, shown as its first item and recalled, right after a cue item, every
    recall_spacing steps counted back from its last item (so the held-out last item is always a
    recall)."""
    recall_spacing: int = 2048
    """With num_themes: steps between a user's theme recalls; no theme item lies within this many
    steps before a recall, so predicting one needs attention at least this far back. Every sequence
    must be longer (min_length > recall_spacing)."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _positive(self, "num_users", "num_items", "num_segments", "out_degree", "min_length")
        _non_negative(self, "seed")
        _require(
            self.out_degree < self.num_items,
            self,
            "out_degree",
            f"must be < num_items ({self.num_items})",
        )
        _require(
            0.0 <= self.noise_prob < 1.0,
            self,
            "noise_prob",
            f"must be in [0, 1), got {self.noise_prob}",
        )
        _require(
            self.min_length >= 3,
            self,
            "min_length",
            f"must be >= 3 (train, valid, test), got {self.min_length}",
        )
        _require(
            self.max_length >= self.min_length,
            self,
            "max_length",
            f"must be >= min_length ({self.min_length})",
        )
        _non_negative(self, "num_themes")
        _require(
            self.recall_spacing >= 2, self, "recall_spacing",
            f"must be >= 2, got {self.recall_spacing}",
        )
        _require(
            self.num_themes == 0 or self.min_length > self.recall_spacing,
            self,
            "min_length",
            f"must be > recall_spacing ({self.recall_spacing}) with num_themes > 0, so that every "
            f"user's last item is a recall; got {self.min_length}",
        )


REPLAY_WINDOWS = ("day", "hour")
"""Replay windows by calendar: one UTC day or one UTC hour of event time; "events:N" cuts N
events."""


def replay_window_events(window: str) -> int | None:
    """N of a replay window "events:N"; None for "day" / "hour"; ValueError for anything else."""
    if window in REPLAY_WINDOWS:
        return None
    head, _, count = window.partition(":")
    if head == "events" and count.isdigit() and int(count) > 0:
        return int(count)
    raise ValueError(f"must be 'day', 'hour' or 'events:N' (N > 0), got {window!r}")


@gin.configurable
@dataclass
class StreamArgs:
    """Online training's event stream (docs/online.md): a folder of partitions, or a replay."""

    path: str | None = None
    """Stream folder: one subfolder per partition, name order = time order, each holding
    .csv/.jsonl/.parquet files with the own-data columns (user_id, item_id, timestamp, optional
    rating); None with replay_dataset replays instead."""
    follow: bool = False
    """Wait for new partitions (poll every poll_seconds) instead of ending after the last complete
    one."""
    poll_seconds: float = 5.0
    """How often the folder is listed while waiting for a partition (follow, or a partition not yet
    complete)."""
    idle_timeout_seconds: float | None = None
    """With follow: stop after this many seconds without a new window; None waits until the stop
    signal."""
    incomplete_timeout_seconds: float = 600.0
    """A partition still without _SUCCESS this many seconds after a newer partition is complete is
    moved to the quarantine."""
    require_success: bool = True
    """A partition counts once it holds an empty _SUCCESS file; False: once it is visible (writers
    that land partitions by an atomic rename of a hidden folder)."""
    quarantine_dir: str | None = None
    """Where bad partitions are moved, each with a _REASON file; None: <path>/_quarantine (same file
    system, so the move is a rename)."""
    max_window_events: int | None = None
    """Cut a partition (or replay window) into windows of at most this many events; None: one window
    per partition."""
    read_retries: int = 5
    """A stream folder's file or partition that cannot be read (an OS error, not bad content) is
    tried again this many times, waiting retry_backoff_seconds, then twice as long each time; then
    the run stops with one line naming the file (it is never set aside for an OS error)."""
    retry_backoff_seconds: float = 1.0
    """The wait before the first retry of a read that failed with an OS error (doubled before each
    next one)."""
    timestamp_unit: str = "s"
    """Unit of the timestamp column: s or ms (windows carry seconds; events are put in time order
    and repeated events found at full precision)."""
    rating_column: str = "rating"
    """Optional column read as the event's rating (a number); partitions without it have none."""
    extra_columns: list[str] = field(default_factory=list)
    """Columns a partition may hold besides user, item, timestamp and rating (not read); any other
    column sets the partition aside."""
    replay_dataset: str | None = None
    """Replay a finished dataset instead of a folder: a name of hstu.registry.DATASETS (its raw
    files at replay_raw), "custom" (CustomDataArgs) or "processed" (a preprocessed folder at
    replay_raw)."""
    replay_raw: str | None = None
    """Raw files (archive or folder) of replay_dataset, or the preprocessed folder for "processed".
    """
    replay_window: str = "day"
    """Replay windows: "day" or "hour" (UTC, event time) or "events:N" (N events each)."""
    publish_every_windows: int = 0
    """Publish a serving version (python -m hstu.export --versioned, docs/serving.md) after every
    N-th window, counted from the stream's start, from a checkpoint saved then; 0: not by windows.
    """
    publish_every_seconds: float = 0.0
    """Publish at the end of a window once this many seconds passed since the last publish; 0: not
    by time."""
    publish_keep: int = 3
    """Serving versions kept in the versioned root (the newest; one a reader holds stays until
    released)."""
    publish_dir: str | None = None
    """The versioned serving root; None: <run_dir>/serving."""
    publish_gate_metric: str | None = None
    """Publish only when this stream metric (e.g. "HR@10", "NDCG@10", "AUC", "NE") over the
    checkpoint's last publish_gate_windows windows is within publish_gate_margin of the served
    version's (python -m hstu.publish --gate-metric); None: no gate."""
    publish_gate_margin: float = 0.0
    """How much worse than the served version's figure a publish may be (lower for HR/NDCG/AUC,
    higher for NE and loss)."""
    publish_gate_windows: int = 5
    """The figures a version records (and the gate compares) are over this many of the
    checkpoint's last evaluated windows."""
    score_served: bool | None = None
    """Also evaluate each window with the serving version users get then (publish_dir's LATEST:
    the weights of the checkpoint it was exported from, a frozen copy beside the trained
    model): rows served_<metric>, served_step and their _cumulative / _faded means; none while
    nothing is served; the publish gate compares them side by side. None: on where the loop
    publishes (publish_every_windows or publish_every_seconds) with static tables; True: also
    beside a publisher run by hand (a dynamic table is refused); False: off. Costs one more
    evaluation per window once a version is served and one copy of the weights
    (docs/online.md "The served version's rows")."""
    batch_until: float | None = None
    """Batch phase (docs/online.md "Streaming against a frozen batch model"): the leading windows
    that end within this fraction of a replay's events (0 < f <= 1) are not evaluated; their events
    are trained as one window for batch_epochs passes, then the stream goes on. None: no batch
    phase."""
    batch_epochs: int = 1
    """Passes over the batch phase's events (shuffled per pass); used with batch_until."""
    evaluate_from: float | None = None
    """The windows that end within this fraction of a replay's events (0 < f <= 1, as batch_until)
    are trained on but not evaluated (the part of a comparison that is not compared); None: every
    window is evaluated."""
    train: bool = True
    """Train on each window after evaluating it; False evaluates every window and never trains (a
    frozen model, e.g. after the batch phase)."""
    stream_lr_scale: float = 1.0
    """Every learning rate (dense layers and tables) times this factor while streaming: after the
    batch phase (batch_until), else from the stream's start. Below 1 keeps a batch-trained model
    from drifting on small windows (docs/online.md); 1 keeps OptimizerArgs' rates."""
    item_capacity: int | None = None
    """With DatasetArgs.dataset_name = "stream" (no preprocessed dataset): the item table's rows,
    the most distinct items the stream may bring (a stream that brings more stops with one line;
    a dynamic item table evicts instead)."""
    rating_classes: int | None = None
    """With DatasetArgs.dataset_name = "stream": ratings are integer classes 0..rating_classes-1
    (the action feature; ranking's labels); None: the stream has no action feature."""
    ids: str = "dense"
    """How raw ids become the model's: "dense" numbers them 1, 2, ... in order of first appearance
    (maps on rank 0 that grow with every id seen; tables of static rows); "hashed" keys them with
    no map (an integer id r is r + 1, a text id a 62-bit hash): memory does not grow with the ids
    seen; the item table must then be dynamic (DynamicEmbeddingArgs), which bounds its rows."""
    item_ttl_days: float | None = None
    """Dynamic item tables: free the rows of items not seen for this many days of event time (the
    newest event's timestamp); None keeps them until evicted for room."""
    user_ttl_days: float | None = None
    """Drop from the user store the users without an event for this many days of event time; None
    keeps every user (within max_users_per_rank)."""
    max_users_per_rank: int | None = None
    """The most users a rank's user store keeps: beyond it, those whose newest event is oldest are
    dropped (their next event starts a new history); None: no bound."""
    late_events: str = "insert"
    """An event older than its user's newest stored event (it arrived late): "insert" places it into
    the user's history in time order (history for later events; not tested, not a target), "drop"
    drops it; counted either way (late_events rows). An event equal to a stored one (same user, item
    and timestamp) is a repeat and always dropped (repeated_events rows)."""
    prequential_fading: float = 0.9999
    """Fading factor per event of the faded prequential metrics (<metric>_faded rows, Gama et al.):
    an event's weight is multiplied by this for every later event, so the mean follows about the
    last 1 / (1 - f) events; the cumulative mean (<metric>_cumulative) is written beside it."""
    continue_from_other_stream: bool = False
    """Resuming a checkpoint written on another stream (another folder, or a replay of other data)
    is refused; True continues that model, its id maps and user store on this stream from its
    first partition (docs/online.md "Which checkpoint a stream run resumes")."""
    full_checkpoint_every: int = 1
    """Every N-th checkpoint of an online run is a full base; the ones between are deltas
    holding the user store rows written and the ids added since the checkpoint before
    (docs/online.md "Checkpoints: bases and deltas"). 1: every checkpoint full. A file named
    full_checkpoint in the checkpoint folder (TrainerArgs.ckpt_save_dir) makes the next one
    full."""
    table_row_deltas: bool = True
    """A delta checkpoint holds the embedding table rows touched since the checkpoint before
    (weights and their optimizer state), not the whole tables; False: the tables whole in every
    checkpoint. Whole anyway where rows are not exact (TrainerArgs.ema_decay, a full-corpus
    loss), said in one line."""

    def __post_init__(self) -> None:
        _validate_fields(self)
        _require(self.path != "", self, "path", "must not be empty")
        _positive(self, "poll_seconds", "idle_timeout_seconds", "incomplete_timeout_seconds",
                  "max_window_events", "publish_keep", "publish_gate_windows")
        _positive(self, "item_capacity", "rating_classes", "item_ttl_days", "user_ttl_days",
                  "max_users_per_rank")
        _require(self.ids in ("dense", "hashed"), self, "ids",
                 f"must be 'dense' or 'hashed', got {self.ids!r}")
        _require(self.late_events in ("insert", "drop"), self, "late_events",
                 f"must be 'insert' or 'drop', got {self.late_events!r}")
        _require(0.0 < self.prequential_fading <= 1.0, self, "prequential_fading",
                 f"must be in (0, 1], got {self.prequential_fading!r}")
        _require(
            isinstance(self.read_retries, int) and not isinstance(self.read_retries, bool)
            and self.read_retries >= 0,
            self, "read_retries", f"must be an integer >= 0, got {self.read_retries!r}",
        )
        _require(self.retry_backoff_seconds >= 0, self, "retry_backoff_seconds", "must be >= 0")
        _require(self.publish_gate_margin >= 0, self, "publish_gate_margin", "must be >= 0")
        _require(self.publish_every_windows >= 0, self, "publish_every_windows", "must be >= 0")
        _require(self.publish_every_seconds >= 0, self, "publish_every_seconds", "must be >= 0")
        _require(
            self.timestamp_unit in ("s", "ms"),
            self,
            "timestamp_unit",
            f"must be 's' or 'ms', got {self.timestamp_unit!r}",
        )
        try:
            replay_window_events(self.replay_window)
        except ValueError as exc:
            raise ConfigError(type(self).__name__, "replay_window", str(exc)) from None
        _require(
            self.path is None or self.replay_dataset is None,
            self,
            "replay_dataset",
            "set either path (a stream folder) or replay_dataset (a replay), not both",
        )
        _require(
            not (self.follow and self.replay_dataset is not None),
            self,
            "follow",
            "a replay has no new partitions to wait for; follow needs path",
        )
        for name in ("batch_until", "evaluate_from"):  # fractions of a replay's events
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and 0.0 < value <= 1.0),
                self, name, f"must be a fraction of the stream's events in (0, 1], got {value!r}",
            )
            _require(
                value is None or self.replay_dataset is not None,
                self, name,
                "needs a replay (replay_dataset): a stream folder's length is not known in advance",
            )
        _require(
            isinstance(self.batch_epochs, int) and not isinstance(self.batch_epochs, bool)
            and self.batch_epochs >= 1,
            self, "batch_epochs", f"must be an integer >= 1, got {self.batch_epochs!r}",
        )
        _require(
            isinstance(self.full_checkpoint_every, int)
            and not isinstance(self.full_checkpoint_every, bool)
            and self.full_checkpoint_every >= 1,
            self, "full_checkpoint_every",
            f"must be an integer >= 1, got {self.full_checkpoint_every!r}",
        )
        _require(isinstance(self.train, bool), self, "train",
                 f"must be True or False, got {self.train!r}")
        _require(
            isinstance(self.stream_lr_scale, (int, float))
            and not isinstance(self.stream_lr_scale, bool) and 0.0 < self.stream_lr_scale,
            self, "stream_lr_scale", f"must be a number > 0, got {self.stream_lr_scale!r}",
        )

    @property
    def publishes(self) -> bool:
        """Whether the online loop publishes serving versions."""
        return self.publish_every_windows > 0 or self.publish_every_seconds > 0

    def publish_due(self, window_index: int, seconds_since_publish: float) -> bool:
        """Whether to publish after window ``window_index`` (0-based, from the stream's start,
        so a resumed run publishes at the same windows)."""
        every, seconds = self.publish_every_windows, self.publish_every_seconds
        by_windows = every > 0 and (window_index + 1) % every == 0
        by_time = seconds > 0 and seconds_since_publish >= seconds
        return by_windows or by_time


DATA_ARG_CLASSES: tuple[type, ...] = (CustomDataArgs, SyntheticDataArgs, StreamArgs)
"""The data's gin classes (the preprocessor's, and the stream's of online training); a gin file
may bind them beside hstu.args.ARG_CLASSES (a run finds them in RunConfig.extras)."""

__all__ = [
    "DATA_ARG_CLASSES",
    "REPLAY_WINDOWS",
    "CustomDataArgs",
    "StreamArgs",
    "SyntheticDataArgs",
    "replay_window_events",
]
