"""Online training: follow a stream of events window by window, test then train (docs/online.md).

For each window of the stream (:mod:`hstu.data.stream`): the current model is first evaluated
on the window's events (prequential: each event is predicted from the user's history before
it), then trained on them in one pass (the targets are the window's events only: a stored
event is history, never trained again), then the window is appended to the user store
(:mod:`hstu.data.user_store`). The model, sharding, optimizers, pipeline, metrics and
checkpoints are the trainer's (:class:`hstu.training.trainer.Trainer`); this module turns a
window into samples of the trainer's loader and drives the loop.

Legend: B users of a window (this rank's), T their events (stored history, then the window's),
L ``DatasetArgs.max_sequence_length``, C ``DatasetArgs.max_num_candidates``.

Checkpoints carry the stream's position and id maps, each rank's user store and
``online.json`` (docs/online.md "Positions and resume"); the batch phase
(``StreamArgs.batch_until``) is one unit, with no checkpoint or stop inside it (docs/online.md
"Streaming against a frozen batch model").
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hstu.args import STREAM_DATASET
from hstu.config import RunConfig
from hstu.data.errors import DataError
from hstu.data.loader import Samples, SequenceLoader, gather_ranges
from hstu.data.store import SequenceStore
from hstu.data.stream import StreamPosition, Window, load_stream, make_source
from hstu.data.stream.core import HashedIds, write_json_atomic
from hstu.data.user_store import Sequences, UserStore
from hstu.embeddings import HstuEmbeddings
from hstu.model.metrics import STDERR_PREFIX
from hstu.training.distributed import DistEnv, broadcast_object
from hstu.training.evaluate import evaluate
from hstu.training.loop import MetricsWindow, Preemption
from hstu.training.online_checkpoints import CHAIN_KEY, StreamCheckpoints, chain_links
from hstu.training.served import SERVED_PREFIX, ServedScorer, ServedVersion, ServedWeights
from hstu.training.trainer import Trainer
from hstu.validation import ConfigError

ONLINE_FILE = "online.json"
STREAM_SPLIT = "stream"
BATCH_EPOCH_BASE = 1 << 32
"""Loader epochs of the batch phase's passes (BATCH_EPOCH_BASE + pass): shuffled apart from
the windows' (which use the window count)."""


# ------------------------------------------------------------------------------ identity
def stream_identity(args: Any, source: Any) -> dict[str, Any]:
    """What a checkpoint records of the stream it was trained on (online.json "stream"): a
    folder's resolved path and its first consumed partition (name and content hash); a
    replay's dataset, windows and a hash of its first events' raw ids and times."""
    if args.path is not None:
        return {"kind": "folder", "path": str(Path(args.path).resolve()),
                "first": source.first_consumed() if source is not None else None}
    head = slice(0, 1000)
    h = hashlib.sha256()
    for arr in (source.user[head], source.item[head], source.timestamp[head]):
        h.update(np.asarray(arr).astype(str).tobytes())
    return {"kind": "replay", "dataset": args.replay_dataset, "window": args.replay_window,
            "events": int(source.num_events), "head": h.hexdigest()[:16]}


def _describe(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "an unrecorded stream"
    if identity["kind"] == "folder":
        first = identity.get("first")
        return (f"stream folder {identity['path']}"
                + (f" (first partition {first[0]})" if first else ""))
    return (f"a replay of {identity['dataset']} by {identity['window']} "
            f"({identity['events']} events)")


def same_stream(saved: dict[str, Any] | None, now: dict[str, Any], source: Any) -> bool:
    """Whether a checkpoint's stream (``saved``) is this run's (``now``): the same folder, or
    a folder holding the saved first partition with the same content (a moved stream); the
    same replay. A checkpoint that recorded none (older runs) is taken as the same."""
    if saved is None:
        return True
    if saved["kind"] != now["kind"]:
        return False
    if saved["kind"] == "replay":
        return all(saved.get(k) == now.get(k) for k in ("dataset", "window", "events", "head"))
    if saved["path"] == now["path"]:
        return True
    first = saved.get("first")
    if not first:
        return False
    from hstu.data.stream.folder import partition_digest

    folder = Path(now["path"]) / first[0]
    return folder.is_dir() and partition_digest(folder) == first[1]


def stream_run_dir(cfg: RunConfig) -> str:
    """The default run directory of an online run: runs/<task>-stream-<name>-<hash>, named
    after its stream (the folder's resolved path; a replay's dataset, raw files and windows),
    so the same command on the same stream continues its run and another stream gets its own."""
    sa = cfg.extras["StreamArgs"]
    if sa.path is not None:
        where = Path(sa.path).resolve()
        name, key = where.name or "stream", str(where)
    else:
        raw = str(Path(sa.replay_raw).resolve()) if sa.replay_raw else ""
        name, key = f"replay-{sa.replay_dataset}", f"{sa.replay_dataset}|{raw}|{sa.replay_window}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]
    return os.path.join("runs", f"{cfg.task}-stream-{name}-"
                        f"{hashlib.sha256(key.encode()).hexdigest()[:8]}")


# ------------------------------------------------------------------------------ samples
def window_store(seqs: Sequences, metadata: dict[str, Any]) -> SequenceStore:
    """The window's sequences (stored history, then the window's events, per user) as an
    in-memory SequenceStore: user b of the window is row range offsets[b]:offsets[b+1]; the
    ratings are the actions (NaN: 0)."""
    ratings = np.nan_to_num(seqs.ratings, nan=0.0).astype(np.int64)
    return SequenceStore(
        offsets=seqs.offsets.astype(np.int64), items=seqs.items.astype(np.int64),
        timestamps=seqs.timestamps.astype(np.int64), actions=ratings, contextual={},
        metadata=metadata,
    )


def _runs(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b [N], j [N]), N = sum(count): entry j of the count[b] entries of each b, b ascending."""
    b = np.repeat(np.arange(len(count), dtype=np.int64), count)
    j = np.arange(len(b), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    return b, j


def retrieval_eval_samples(seqs: Sequences, max_len: int) -> Samples:
    """One sample per new event with a history: the L items before it as the query's input,
    the event's item as the target (events of a user never seen before the first: none)."""
    offsets = seqs.offsets.astype(np.int64)
    b, j = _runs(seqs.num_new)
    rows = (offsets[1:] - seqs.num_new)[b] + j  # the new events' flat rows
    off = offsets[:-1][b]
    keep = rows > off
    b, rows, off = b[keep], rows[keep], off[keep]
    start = np.maximum(off, rows - max_len)
    return Samples(b, start, rows.copy(), rows.copy(), rows.copy())


def retrieval_train_samples(seqs: Sequences, max_len: int) -> tuple[Samples, np.ndarray]:
    """(samples, first_trained int64 [S]): each user's new events as next-item targets, in
    chunks of at most L - 1 targets (a sample of up to L items ending at its chunk's last
    target); position j of a sample is trained only from ``first_trained`` on, so that only
    the window's events are targets (the stored history is input only)."""
    offsets = seqs.offsets.astype(np.int64)
    off, end = offsets[:-1], offsets[1:]
    first_target = np.maximum(end - seqs.num_new, off + 1)
    targets = np.maximum(end - first_target, 0)
    step = max(max_len - 1, 1)
    b, within = _runs(-(-targets // step))  # chunks per user (none without targets)
    t1 = end[b] - within * step  # one past the chunk's last target
    t0 = np.maximum(first_target[b], t1 - step)
    start = np.maximum(off[b], t1 - max_len)
    order = np.lexsort((t1, b))  # per user, in time order
    b, t0, t1, start = b[order], t0[order], t1[order], start[order]
    return Samples(b, start, t1.copy(), t1.copy()), (t0 - 1 - start).astype(np.int64)


def ranking_samples(seqs: Sequences, max_len: int, max_cands: int) -> Samples:
    """The window's events as candidates, at most C per sample (per user in time order), the
    L events before each chunk as its history (a user's very first event has none: left out)."""
    offsets = seqs.offsets.astype(np.int64)
    off, end = offsets[:-1], offsets[1:]
    first = np.maximum(end - seqs.num_new, off + 1)
    b, within = _runs(-(-np.maximum(end - first, 0) // max_cands))
    hist_end = first[b] + within * max_cands
    cand_end = np.minimum(hist_end + max_cands, end[b])
    start = np.maximum(off[b], hist_end - max_len)
    return Samples(b, start, hist_end, cand_end)


class WindowLoader(SequenceLoader):
    """The trainer's loader over one window's samples of this rank (same features, negatives,
    batch size; shuffled by (seed, window)); retrieval training batches carry ``first_trained``.

    With several ranks each rank holds the samples of the users it owns (the user store's
    sharding), so the counts differ: every rank runs ``per_rank`` samples (the largest count,
    agreed over the ranks), its own padded by wrapping around and marked ``sample_mask =
    False``. Padding is never trained (a retrieval padding sample has no query, a ranking one
    weighs 0 in the loss) nor evaluated: every event is trained and evaluated exactly once.
    """

    first_trained: np.ndarray | None = None
    num_real: int = 0

    @classmethod
    def over(cls, base: SequenceLoader, store: SequenceStore, samples: Samples, epoch: int,
             per_rank: int, num_real: int, first_trained: np.ndarray | None = None,
             ) -> WindowLoader:
        loader = copy.copy(base)
        loader.__class__ = cls
        loader.store, loader.samples = store, samples
        loader.num_real, loader.samples_per_rank = num_real, per_rank
        loader.epoch, loader.batch_index = epoch, 0
        loader.drop_last = False  # every event of the window is trained
        loader.first_trained = first_trained
        return loader  # type: ignore[return-value]

    def __iter__(self):  # type: ignore[override]
        num = len(self.samples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_real)
        else:
            order = np.arange(self.num_real)
        real = np.ones(self.samples_per_rank, dtype=bool)
        if self.samples_per_rank > self.num_real:
            # wrap (or, with no sample of its own, the placeholder sample after the real ones)
            pad = self.samples_per_rank - self.num_real
            fill = order if self.num_real else np.arange(num)
            order = np.concatenate([order, np.resize(fill, pad)])
            real[self.num_real:] = False
        padded = not real.all()
        while self.batch_index < len(self):
            start = self.batch_index * self.batch_size
            sel = slice(start, start + self.batch_size)
            self.batch_index += 1
            mask = real[sel] if (padded or not self.training) else None
            yield self.make_batch(order[sel], mask)
        self.epoch, self.batch_index = self.epoch + 1, 0

    def make_batch(self, index: np.ndarray, mask: np.ndarray | None = None,
                   tp_sizes: Any = None) -> Any:
        # padding in training (``mask``): the ranking loss weighs it 0 (RankingModel), a
        # retrieval sample gets no query (first_trained past its history, below)
        batch = super().make_batch(index, mask, tp_sizes)
        if self.first_trained is None:
            return batch
        if batch.negative_index is not None:
            raise ConfigError(
                "RetrievalArgs", "negative_sampling",
                "online training trains only the window's events: use full_corpus or in-batch "
                "negatives (drawn negatives are per history position)",
            )
        first = self.first_trained[index].copy()
        sizes = batch.require_sizes()
        hist = sizes.history_per_sample
        if mask is not None:
            first[~mask] = hist[~mask]
            batch.sample_mask = None
        batch.first_trained = torch.from_numpy(first)
        batch.sizes = replace(sizes, num_queries=int(np.maximum(hist - 1 - first, 0).sum()))
        return batch


def merge_windows(windows: list[Window]) -> Window:
    """Consecutive windows as one (the batch phase): their events in stream order, from the
    first one's position to the last one's. Legend: E events of all of them."""
    first, last = windows[0], windows[-1]
    if any(w.rating is not None for w in windows):
        rating = np.concatenate([np.full(w.num_events, np.nan) if w.rating is None else
                                 np.asarray(w.rating, np.float64) for w in windows])
    else:
        rating = None

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(w, name) for w in windows])

    return Window(
        name=first.name if len(windows) == 1 else f"{first.name}..{last.name}",
        position_before=first.position_before, position_after=last.position_after,
        user=cat("user"), item=cat("item"), timestamp=cat("timestamp"), rating=rating,
        raw_user=cat("raw_user"), raw_item=cat("raw_item"), lag=last.lag,
        new_users=sum(w.new_users for w in windows), new_items=sum(w.new_items for w in windows),
    )


def placeholder_sequences() -> Sequences:
    """One user with one stored and one new event of item 1: the sample a rank without a user
    of the window runs (masked) so that every rank takes the same steps."""
    return Sequences(
        offsets=np.array([0, 2], np.int64), items=np.ones(2, np.int64),
        timestamps=np.zeros(2, np.int64), ratings=np.zeros(2), users=np.zeros(1, np.int64),
        num_new=np.ones(1, np.int64),
    )


@dataclass
class WindowWork:
    """One window's samples on this rank, and what the ranks agreed on: each runs
    ``eval_per_rank`` / ``train_per_rank`` samples (the largest count over the ranks), its
    ``num_eval`` / ``num_train`` real ones first (the others: masked padding)."""

    store: SequenceStore
    eval_samples: Samples
    train_samples: Samples
    first_trained: np.ndarray | None
    num_eval: int
    num_train: int
    eval_per_rank: int
    train_per_rank: int
    eval_total: int
    """Evaluated samples over all ranks."""
    targets: int
    """Events trained as targets over all ranks."""
    screened: dict[str, int] = field(default_factory=dict)
    """Events the user stores took out of the window, over all ranks (UserStore.screen)."""
    train_tokens: int = 0
    """Items (history and candidates) of the training samples over all ranks: what one
    training pass encodes."""
    eval_tokens: int = 0
    """Items of the tested samples over all ranks (ranking: the training samples)."""


# ------------------------------------------------------------------------------ the loop
_TORCHRUN_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


class OnlineTrainer:
    """The trainer on a stream: test then train each window, checkpoints with the stream."""

    def __init__(self, cfg: RunConfig, env: DistEnv, run_dir: str, config_text: str) -> None:
        self.cfg, self.env = cfg, env
        self.stream_args = cfg.extras["StreamArgs"]
        self._check(cfg, env)
        self.stop_requested = False
        self._preemption: Preemption | None = None
        # rank 0 reads the stream (listing, quarantine, id maps) and sends each window to the
        # others (_windows): every rank sees the same windows, whatever lands in the folder
        self.source = make_source(
            self.stream_args, stop=self._stop,
            columns=cfg.extras.get("CustomDataArgs"),
        ) if env.rank == 0 else None
        self.known_items = 0
        self._window_group = None
        if env.world_size > 1:
            # waiting for a partition (StreamArgs.follow) may outlast the default timeout
            timeout = timedelta(days=365) if self.stream_args.follow else None
            self._window_group = dist.new_group(backend="gloo", timeout=timeout)
        if cfg.trainer.ckpt_save_dir is None:  # a stream run owns its checkpoints
            cfg.trainer = replace(cfg.trainer,
                                  ckpt_save_dir=os.path.join(run_dir, "checkpoints"))
        self.trainer = Trainer(cfg, env, run_dir, config_text)
        t = self.trainer
        self.max_len = cfg.dataset.max_sequence_length
        self.windows_done = 0
        self.events_done = 0
        """Events of the windows done (from the stream's start)."""
        self.interrupted = False
        self.windows_this_run = 0
        self._preq: dict[str, list[float]] = {}
        """metric -> [sum, weight, faded sum, faded weight] of the prequential means."""
        work = Path(run_dir) / f"user_store.rank{env.rank}-of-{env.world_size}.work.sqlite"
        loaded = t.checkpoint.loaded
        self.resumed_from = loaded
        # full bases and deltas (docs/online.md "Checkpoints: bases and deltas")
        self.checkpoints = StreamCheckpoints(self.stream_args.full_checkpoint_every,
                                             cfg.trainer.ckpt_save_dir, env.rank, t.logger.print)
        self.touched = self.checkpoints.track_rows(t.model, self.stream_args.table_row_deltas,
                                                   cfg.trainer.ema_decay > 0)
        if loaded is not None:
            done = json.loads((Path(loaded) / ONLINE_FILE).read_text())
            links = chain_links(loaded)  # a delta's base and deltas before it
            other = None  # the checkpoint's stream when it is not this one (rank 0 decides)
            if self.source is not None:
                self.position = load_stream(loaded, self.source, links)
                self.known_items = len(self.source.items)
                now = stream_identity(self.stream_args, self.source)
                if not same_stream(done.get("stream"), now, self.source):
                    other = _describe(done.get("stream"))
            else:
                self.position = StreamPosition.from_dict(done["position"])
            other = broadcast_object(other)
            self.store = UserStore.restore(loaded, work, self.max_len, env.rank, env.world_size,
                                           links=links)
            self.checkpoints.resumed(loaded, links, self.source)
            self.windows_done = int(done["windows"])
            self.events_done = int(done.get("events", -1))  # -1: a checkpoint before the count
            self._preq = {k: [float(x) for x in v] for k, v in done.get("prequential", {}).items()}
            self._drop_rows_after(self.windows_done)
            if other is not None:
                self._continue_on_new_stream(loaded, other)
            else:
                t.logger.print(
                    f"[hstu] stream: resumed after {self.windows_done} windows at partition "
                    f"{self.position.partition!r} row {self.position.row} ({loaded})"
                )
        else:
            work.unlink(missing_ok=True)
            self.position = StreamPosition.start()
            self.store = UserStore(work, self.max_len, env.rank, env.world_size)
        self.event_clock = int(done.get("event_clock", 0)) if loaded is not None else 0
        """The newest event time read so far (seconds): the clock of expiry."""
        self.remappers = self._item_remappers()
        if self.stream_args.ids == "hashed" and not self.remappers:
            raise ConfigError(
                "StreamArgs", "ids",
                "'hashed' keys items with no map, so the item table must bound its own rows: "
                "make it dynamic (a DynamicEmbeddingArgs item table)")
        if self.stream_args.item_ttl_days is not None and not self.remappers:
            raise ConfigError("StreamArgs", "item_ttl_days",
                              "expiry frees rows of a dynamic item table; this run's is static")
        t.checkpoint.extra_files = self._stream_files
        self._saved_position: StreamPosition | None = None
        self.publish_dir = self.stream_args.publish_dir or str(Path(run_dir) / "serving")
        self.served = self._served_scorer(run_dir, done if loaded is not None else None)
        self._published_at = time.monotonic()
        self.last_checkpoint = ""
        self._pending_rows: list[tuple[int, str, dict[str, float]]] = []

    def _continue_on_new_stream(self, loaded: str, other: str) -> None:
        """The checkpoint ``loaded`` was trained on another stream (``other``): refused in one
        line, or with StreamArgs.continue_from_other_stream its model, id maps and user store
        go on with this stream from its first partition."""
        here = _describe(stream_identity(self.stream_args, None)) if self.stream_args.path \
            else f"a replay of {self.stream_args.replay_dataset}"
        if not self.stream_args.continue_from_other_stream:
            raise ConfigError(
                "TrainerArgs", "ckpt_load_dir",
                f"checkpoint {loaded} was trained on {other}, this run reads {here}: give this "
                "stream its own TrainerArgs.run_dir (or TrainerArgs.ckpt_save_dir), or set "
                "StreamArgs.continue_from_other_stream=True to continue that model on this "
                "stream from its start",
            )
        self.position = StreamPosition.start()
        if self.source is not None:
            state = self.source.state_dict()
            if "consumed" in state:  # a folder's ledger is the other stream's
                state["consumed"] = []
            self.source.load_state_dict(state)
        self.trainer.logger.print(
            f"[hstu] stream: continuing the model of {loaded} ({self.windows_done} windows of "
            f"{other}) on {here} from its start (StreamArgs.continue_from_other_stream)"
        )

    def _served_scorer(self, run_dir: str, done: dict[str, Any] | None) -> ServedScorer | None:
        """StreamArgs.score_served: the served version scored on each window beside the trained
        model (None: where this run publishes, with static tables; a dynamic table's id-to-row
        state is the trained model's only, so the served version's rows could not be its own)."""
        wanted = self.stream_args.score_served
        if wanted is None:
            wanted = self.stream_args.publishes and not self.remappers
            if self.stream_args.publishes and self.remappers:
                self.trainer.logger.print(
                    "[hstu] served version: not scored (a dynamic table's id-to-row state is not "
                    "kept per version; StreamArgs.score_served)")
        if wanted and self.remappers:
            raise ConfigError("StreamArgs", "score_served",
                              "the served version is scored with static tables only (a dynamic "
                              "table's id-to-row state is not kept per version): set False")
        if not wanted:
            return None
        t = self.trainer
        current = ServedVersion.from_dict(done.get("served")) if done else None
        return ServedScorer(ServedWeights(t.model, self.cfg.task, self.cfg.network),
                            self.publish_dir, run_dir, self.env.rank, resumed=done is not None,
                            current=current, say=t.logger.print)

    def _stop(self) -> bool:
        """The source's stop signal (checked between windows and while it waits for a
        partition with StreamArgs.follow): the loop is done, or SIGTERM/SIGUSR1 came."""
        return self.stop_requested or (self._preemption is not None and self._preemption.requested)

    @staticmethod
    def _check(cfg: RunConfig, env: DistEnv) -> None:
        t = cfg.trainer
        if t.pipeline_type != "none":
            raise ConfigError("TrainerArgs", "pipeline_type",
                              'online training runs pipeline_type="none" (one pass per window)')
        if env.tp_size > 1:
            raise ConfigError("TPArgs", "tensor_model_parallel_size",
                              "online training runs without tensor parallelism (1)")
        if t.best_metric is not None:
            raise ConfigError("TrainerArgs", "best_metric",
                              "online training evaluates each window (split stream); set None")
        for name in ("time_budget_minutes", "max_train_epochs", "eval_interval_epochs"):
            if getattr(t, name) is not None:  # (a stream has no epochs and no end)
                raise ConfigError("TrainerArgs", name,
                                  "online training runs as long as its stream: set None")
        ds = cfg.dataset
        if getattr(ds, "contextual_features", None) not in ([], ()):
            raise ConfigError("DatasetArgs", "contextual_features",
                              "online training has no contextual features yet: set []")
        if getattr(ds, "stochastic_length", None) not in (None, False, 0, 0.0):
            raise ConfigError("DatasetArgs", "stochastic_length",
                              "online training keeps whole histories")
        if cfg.task == "ranking" and cfg.ranking.history_loss_weight > 0:
            raise ConfigError("RankingArgs", "history_loss_weight",
                              "online training trains the window's events only: set 0 (history "
                              "labels were trained in earlier windows)")

    # ---------------------------------------------------------------- checkpoint files
    def _stream_files(self, folder: str) -> list[str]:
        """This rank's stream files of a checkpoint being written into ``folder``."""
        names = self.checkpoints.write_store(folder, self.store)
        if self.source is not None:
            assert self._saved_position is not None
            items = self.source.items
            if isinstance(items, HashedIds) and self.remappers:
                # the text of text item ids: kept for the items that hold a row, no others
                items.prune(torch.cat([r.live_ids() for r in self.remappers]).numpy())
            names += self.checkpoints.write_stream(folder, self._saved_position, self.source)
            done = {"windows": self.windows_done, "step": self.trainer.step,
                    "position": self._saved_position.to_dict(),
                    "stream": stream_identity(self.stream_args, self.source),
                    "prequential": self._preq, "event_clock": self.event_clock,
                    CHAIN_KEY: self.checkpoints.info()}
            if self.served is not None:  # the version scored at the checkpoint's last window
                done["served"] = self.served.state_dict()
            if self.events_done >= 0:  # unknown after a resume from a checkpoint without it
                done["events"] = self.events_done
            write_json_atomic(Path(folder) / ONLINE_FILE, done)
            names.append(ONLINE_FILE)
        return names

    def save(self, position: StreamPosition) -> str:
        """The trainer's checkpoint with the stream's files (full, or a delta); the rows of
        the windows it covers are written first (a kill before it is published drops them
        again on resume), its own (checkpoint_bytes, ...) right after it."""
        t = self.trainer
        self._flush_rows()
        self._saved_position = position
        # a window without a training step saves the same step again, with its new position
        t.checkpoint.periodic.last_saved = None
        t.checkpoint.needs = self.checkpoints.decide(t.step).needs
        if self.served is not None:  # a resume loads the served versions' weights again
            t.checkpoint.periodic.pinned = self.served.pinned(self.windows_done)
        started = time.perf_counter()
        self.checkpoints.write_rows(t.checkpoint)
        self.last_checkpoint = t.checkpoint.save(t.step)
        self._pending_rows.append((t.step, STREAM_SPLIT, self.checkpoints.saved(
            self.last_checkpoint, time.perf_counter() - started, self.store, self.source,
            t.checkpoint)))
        self._flush_rows()
        return self.last_checkpoint

    def publish_version(self, ckpt: str) -> None:
        """Starts ``python -m hstu.publish`` in a background process (training does not
        wait for the export; its lines go to ``<run_dir>/publish.log``): it exports the newest
        checkpoint of the save root (``ckpt``, just saved, or a newer one by the time its turn
        comes) as the newest serving version, if the gate (StreamArgs.publish_gate_*) admits it.
        Publishers take turns; while one exports and another waits, this publish is skipped in
        one line (the waiting one takes the newest checkpoint)."""
        t, sa = self.trainer, self.stream_args
        alive = [p for p in getattr(self, "_publishers", []) if p.poll() is None]
        self._publishers = alive
        if len(alive) >= 2:
            t.logger.print(f"[hstu] publishing step {t.step} skipped: a publisher is exporting and "
                           f"another (pid {alive[-1].pid}) waits to take the newest checkpoint")
            return
        run_dir = Path(t.logger.run_dir)
        cmd = [sys.executable, "-m", "hstu.publish", "--run", str(run_dir),
               "--ckpt", str(Path(ckpt).parent), "--out", self.publish_dir,
               "--keep", str(sa.publish_keep), "--gate-windows", str(sa.publish_gate_windows),
               "--nice", "10"]
        if sa.publish_gate_metric:
            cmd += ["--gate-metric", sa.publish_gate_metric,
                    "--gate-margin", repr(sa.publish_gate_margin)]
        # a process of its own, not a rank of this job: none of torchrun's variables, its own
        # session (a signal to the job does not cut an export short)
        env = {k: v for k, v in os.environ.items()
               if k not in _TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
        with open(run_dir / "publish.log", "ab") as log:
            alive.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        self._published_at = time.monotonic()
        t.logger.print(f"[hstu] publishing step {t.step} into {self.publish_dir} in the background "
                       f"(pid {alive[-1].pid}; its lines in {run_dir / 'publish.log'})")

    # ---------------------------------------------------------------- the ranks agree
    def windows(self) -> Iterator[Window]:
        """The stream's windows from the current position, on every rank: rank 0 reads them
        from the source and broadcasts each (with the number of items known after it)."""
        if self.source is not None and self._window_group is None:
            for window in self.source.windows(self.position):
                self.known_items = len(self.source.items)
                yield window
            return
        ours = self.source.windows(self.position) if self.source is not None else None
        while True:
            msg: list[Any] = [None]
            if ours is not None:
                window = next(ours, None)
                msg = [None if window is None else (window, len(self.source.items))]
            dist.broadcast_object_list(msg, src=0, group=self._window_group)
            if msg[0] is None:
                return
            window, self.known_items = msg[0]
            yield window

    def _all_counts(self, *local: int) -> np.ndarray:
        """int64 [world, len(local)]: every rank's ``local`` counts (one host all-reduce)."""
        world = self.env.world_size
        table = torch.zeros(world, len(local), dtype=torch.int64)
        table[self.env.rank] = torch.tensor(local, dtype=torch.int64)
        if world > 1:
            dist.all_reduce(table)
        return table.numpy()

    def _item_remappers(self) -> list[Any]:
        """The dynamic tables' remappers (empty when every table is static)."""
        return [r for m in self.trainer.model.sparse.modules() if isinstance(m, HstuEmbeddings)
                for r in m.remappers.values()]

    def _expire(self) -> tuple[int, int]:
        """After a window: frees dynamic table rows and drops stored users past their time to
        live, and users beyond the store's bound (StreamArgs item_ttl_days, user_ttl_days,
        max_users_per_rank); (rows freed, users dropped on this rank)."""
        sa = self.stream_args
        freed = 0
        if sa.item_ttl_days is not None:
            before = self.event_clock - int(sa.item_ttl_days * 86400)
            freed = sum(r.expire(before) for r in self.remappers)
        dropped = 0
        if sa.user_ttl_days is not None or sa.max_users_per_rank is not None:
            before = (None if sa.user_ttl_days is None
                      else self.event_clock - int(sa.user_ttl_days * 86400))
            dropped = self.store.expire(before, sa.max_users_per_rank)
        return freed, dropped

    def _table_rows(self) -> dict[str, float]:
        """Each dynamic table's occupied rows and ids evicted so far, and with admission the
        training lookups of ids not admitted so far (its remapper's counts, the same on every
        rank)."""
        out: dict[str, float] = {}
        for module in self.trainer.model.sparse.modules():
            if isinstance(module, HstuEmbeddings):
                for name, s in module.stats().items():
                    out[f"{name}_occupied"] = float(s["occupied"])
                    out[f"{name}_evicted"] = float(s["evicted_total"])
                    if module.remappers[name].admission is not None:
                        out[f"{name}_not_admitted"] = float(s["not_admitted_total"])
        return out

    def _admits_targets(self) -> bool:
        """Retrieval over a dynamic item table with admission (targets may be left out)."""
        return self.cfg.task == "retrieval" and any(r.admission is not None
                                                    for r in self.remappers)

    def _not_admitted_targets(self) -> int:
        """Retrieval with admission: this rank's targets left out of the loss since the last
        window (their item not admitted yet); 0 otherwise."""
        take = getattr(self.trainer.model.dense_module, "take_not_admitted_targets", None)
        return 0 if take is None else take()

    def _drop_rows_after(self, windows: int) -> None:
        """On resume: drops the ``stream`` rows of windows after the checkpoint's ``windows``
        from metrics.csv. The trainer drops rows of steps after the checkpoint; windows
        without a training step (``StreamArgs.train`` False, a window with no target) write
        theirs at the checkpoint's own step and would otherwise be logged twice after a kill
        between their rows and their checkpoint."""

        def keep(rows: list[list[str]]) -> list[list[str]]:
            kept = []
            number = 0.0  # the window whose rows these are: a window's rows start with "window"
            for row in rows:
                if len(row) == 4 and row[1] == STREAM_SPLIT and row[2] == "window":
                    number = float(row[3])
                if len(row) != 4 or row[1] != STREAM_SPLIT or number <= windows:
                    kept.append(row)
            return kept

        self.trainer.logger.keep_rows(keep)

    def _train_rows(self, window_metrics: MetricsWindow, steps: int) -> None:
        """The ``train`` row of a window's ``steps`` steps (none without a step)."""
        t = self.trainer
        window_metrics.flush(t.step)
        if steps:
            self._pending_rows.append((t.step, "train", window_metrics.summarize(t.optimizer)))
        else:
            window_metrics.reset()

    def _flush_rows(self) -> None:
        for step, split, metrics in self._pending_rows:
            self.trainer.logger.log(step, split, metrics)
        self._pending_rows.clear()

    # ---------------------------------------------------------------- one window
    def _samples(self, seqs: Sequences) -> tuple[Samples, Samples, np.ndarray | None]:
        """(evaluation samples, training samples, retrieval's first_trained) of ``seqs``."""
        if self.cfg.task == "retrieval":
            train, first = retrieval_train_samples(seqs, self.max_len)
            return retrieval_eval_samples(seqs, self.max_len), train, first
        samples = ranking_samples(seqs, self.max_len, self.cfg.dataset.max_num_candidates)
        return samples, samples, None

    def prepare_window(self, seqs: Sequences,
                       screened: dict[str, int] | None = None) -> WindowWork:
        """The samples of one window (this rank's users ``seqs``) and the counts every rank
        needs to take the same steps (one host all-reduce; with them this rank's
        ``screened`` counts, :meth:`UserStore.screen`, summed over the ranks)."""
        real = len(seqs.users) > 0
        if not real:  # no user of this window here: a placeholder keeps the steps in step
            seqs = placeholder_sequences()
        store = window_store(seqs, self.trainer.built.train_loader.store.metadata)
        eval_s, train_s, first = self._samples(seqs)
        targets = int((train_s.cand_end - (train_s.hist_end if first is None else
                                           train_s.hist_start + first + 1)).sum())
        n_eval, n_train = (len(eval_s), len(train_s)) if real else (0, 0)
        tokens = [int((s.cand_end - s.hist_start).sum()) if real else 0 for s in (train_s, eval_s)]
        names = sorted(screened or {})
        counts = self._all_counts(n_eval, n_train, targets if real else 0, *tokens,
                                  *(int((screened or {})[k]) for k in names))
        return WindowWork(
            store, eval_s, train_s, first, n_eval, n_train, eval_per_rank=int(counts[:, 0].max()),
            train_per_rank=int(counts[:, 1].max()), eval_total=int(counts[:, 0].sum()),
            targets=int(counts[:, 2].sum()),
            screened={k: int(counts[:, 5 + i].sum()) for i, k in enumerate(names)},
            train_tokens=int(counts[:, 3].sum()), eval_tokens=int(counts[:, 4].sum()),
        )

    def evaluate_window(self, work: WindowWork, known: int | None = None) -> dict[str, float]:
        """The current model on the window's events (before any training on them); retrieval
        ranks over the items known (``known``: the first ``known`` dense ids; default: the
        items known now)."""
        t, cfg = self.trainer, self.cfg
        if work.eval_per_rank == 0:
            return {"eval_events": 0.0}
        store, samples = work.store, work.eval_samples
        loader = WindowLoader.over(t.built.eval_loader, store, samples, self.windows_done,
                                   work.eval_per_rank, work.num_eval)
        live = t.model.live_items() if cfg.task == "retrieval" else None
        if live is not None:  # a dynamic item table: the items its rows hold are the corpus
            metrics = evaluate(t.model, loader, cfg, self.env, None, items=live)
            metrics["eval_events"] = float(work.eval_total)
        elif cfg.task == "retrieval":
            with self.known_corpus(known):
                metrics = evaluate(t.model, loader, cfg, self.env, None)
            metrics["eval_events"] = float(work.eval_total)
        else:
            metrics = evaluate(t.model, loader, cfg, self.env, None)
            real = samples.select(np.arange(work.num_eval))
            labels = store.actions[gather_ranges(real.hist_end, real.cand_end)]
            counts = _label_counts(labels, self.env.world_size)
            metrics["NE"] = metrics["loss"] / _entropy(counts)
            metrics["eval_events"] = float(counts.sum())
        t.model.train()
        # a window's rows are its means (prequential ones are weighted over windows): the
        # standard errors model selection uses are no window metric
        return {k: v for k, v in metrics.items() if not k.startswith(STDERR_PREFIX)}

    def score_served(self, work: WindowWork, metrics: dict[str, float]) -> dict[str, float]:
        """The served version on the window's samples (the trained model's, same metrics),
        over its own catalogue (the items the stream knew at its checkpoint): ``served_<m>``
        and ``served_step``; empty while nothing is served (StreamArgs.score_served)."""
        if self.served is None or work.eval_per_rank == 0:
            return {}
        started = time.perf_counter()
        version = self.served.choose(self.windows_done + 1)
        if version is None:
            return {}
        with self.served.weights.swapped():
            theirs = self.evaluate_window(work, known=version.known_items)
        self._served_seconds = time.perf_counter() - started  # (the log line's; not a row)
        assert theirs["eval_events"] == metrics["eval_events"], (theirs, metrics)
        return {SERVED_PREFIX + "step": float(version.step),
                **{SERVED_PREFIX + k: v for k, v in theirs.items() if k != "eval_events"}}

    def _served_text(self, served: dict[str, float]) -> str:
        if not served:
            return ""
        step = int(served[SERVED_PREFIX + "step"])
        return f"; served v{step} " + " ".join(
            f"{k.removeprefix(SERVED_PREFIX)} {v:.4f}" for k, v in served.items()
            if k != SERVED_PREFIX + "step") + f" ({self._served_seconds:.2f} s)"

    def train_window(self, work: WindowWork, window_metrics: MetricsWindow,
                     epoch: int | None = None) -> int:
        """One pass over the window's events as targets (shuffled by (seed, ``epoch``), the
        window count by default); returns the steps taken."""
        t = self.trainer
        if work.train_per_rank == 0:
            return 0
        loader = WindowLoader.over(t.built.train_loader, work.store, work.train_samples,
                                   self.windows_done if epoch is None else epoch,
                                   work.train_per_rank, work.num_train, work.first_trained)
        prepare = t._prepare_for_device()
        batches = iter(self._noted(b if prepare is None else prepare(b)) for b in loader)
        steps = 0
        t.model.train()
        with self.known_corpus():
            while True:
                try:
                    loss = t.train_step(batches)
                except StopIteration:
                    break
                window_metrics.record(loss, t.optimizer.last_grads_finite, 0, 0.0)
                steps += 1
        return steps

    def _noted(self, batch: Any) -> Any:
        """A training batch as the tables will see it: its rows noted for the next delta."""
        if self.touched is not None:
            self.touched.note(batch.features)
        return batch

    @contextlib.contextmanager
    def known_corpus(self, known_items: int | None = None) -> Iterator[None]:
        """Retrieval: the items known so far (dense ids 1..K of the id map; ``known_items``
        K when given) are the corpus of the evaluation and of the full-corpus loss (rows past
        them hold no item yet)."""
        dense = self.trainer.model.dense_module
        if self.cfg.task != "retrieval" or not hasattr(dense, "num_items") or self.remappers:
            yield  # (a dynamic item table's corpus is its live rows)
            return
        known = (self.known_items if known_items is None else known_items) + 1
        table = dense.num_items
        if known > table:
            knob = ("StreamArgs.item_capacity" if self.cfg.dataset.dataset_name == STREAM_DATASET
                    else "item/EmbeddingArgs.item_vocab_size_or_capacity")
            raise DataError(
                "stream", f"{known - 1} distinct items, the item table has {table - 1} rows for "
                f"them (raise {knob})")
        source = getattr(dense, "corpus_source", None)
        dense.num_items = known
        if source is not None:
            source.num_items = known
        try:
            yield
        finally:
            dense.num_items = table
            if source is not None:
                source.num_items = table

    # ---------------------------------------------------------------- the batch phase
    def batch_cut(self, field: str) -> int:
        """Events of the stream's first StreamArgs.``field`` (``batch_until`` or
        ``evaluate_from``, a fraction of a replay's events; rank 0 counts them and tells the
        others)."""
        local = 0
        if self.source is not None:  # (StreamArgs allows these fields with a replay only)
            total = self.source.num_events  # type: ignore[attr-defined]
            local = int(np.floor(getattr(self.stream_args, field) * total + 1e-9))
        return int(self._all_counts(local)[0, 0]) if self.env.world_size > 1 else local

    def batch_phase(self, windows: Iterator[Window],
                    window_metrics: MetricsWindow) -> tuple[Window | None, StreamPosition | None]:
        """Reads the leading windows that end within the first ``batch_cut()`` events, trains
        all their events as one window for ``StreamArgs.batch_epochs`` passes (no evaluation),
        appends them to the user store and saves a checkpoint. Returns the first window after
        the cut (None: the stream ended) and the position after the phase (None: no window
        was in it)."""
        t, sa = self.trainer, self.stream_args
        started = time.perf_counter()
        cut = self.batch_cut("batch_until")
        taken: list[Window] = []
        consumed = known = 0
        after: Window | None = None
        for window in windows:
            if consumed + window.num_events > cut:
                after = window
                break
            taken.append(window)
            consumed += window.num_events
            known = self.known_items  # the items known after the phase's last window
        if not taken:
            t.logger.print(f"[hstu] batch phase: no window ends within the first {cut} events")
            return after, None
        merged = merge_windows(taken)
        work = self.prepare_window(self.store.sequences(merged))
        steps = 0
        t.model.train()
        for epoch in range(sa.batch_epochs):
            steps += self.train_window(work, window_metrics, epoch=BATCH_EPOCH_BASE + epoch)
        self.store.append(merged)
        self.windows_done += len(taken)
        self.events_done += 0 if self.events_done < 0 else consumed
        self._train_rows(window_metrics, steps)
        admission = {}
        if self._admits_targets():  # every rank's targets left out (every rank is here)
            waited = self._all_counts(self._not_admitted_targets())[:, 0].sum()
            admission["not_admitted_targets"] = float(waited)
        self._pending_rows.append((t.step, STREAM_SPLIT, {
            "window": float(self.windows_done), "eval_events": 0.0, "events": float(consumed),
            "train_steps": float(steps), "trained_events": float(work.targets * sa.batch_epochs),
            "batch_windows": float(len(taken)), "batch_epochs": float(sa.batch_epochs),
            "known_items": float(known),
            "events_waiting": float(merged.lag.events_waiting),
            "seconds_behind": float(merged.lag.seconds_behind),
            "window_seconds": time.perf_counter() - started, **admission,
        }))
        t.logger.print(
            f"[hstu] batch phase: windows 1-{self.windows_done} {merged.name}: {consumed} events "
            f"(the first {sa.batch_until:g} of the stream), {work.targets} targets x "
            f"{sa.batch_epochs} passes, not evaluated; {steps} steps (step {t.step}); then the "
            f"stream, {'trained' if sa.train else 'evaluated only (frozen)'}"
        )
        if self.cfg.trainer.ckpt_save_interval > 0:
            self.save(merged.position_after)
        else:
            self._flush_rows()
        return after, merged.position_after

    # ---------------------------------------------------------------- the run
    def train(self) -> dict[str, float]:
        t, args = self.trainer, self.cfg.trainer
        every = args.ckpt_save_interval
        limit = args.max_train_iters
        t.open_pipeline()
        window_metrics = MetricsWindow(t.peak, self.env.world_size)
        last: dict[str, float] = {}
        position = self.position
        saved_at = self.windows_done
        learn = self.stream_args.train
        # evaluate_from: windows ending within its first events are trained, not evaluated
        # (counted from the stream's start; on resume from the windows' own positions)
        quiet_until = (self.batch_cut("evaluate_from")
                       if self.stream_args.evaluate_from is not None else 0)
        if quiet_until and self.events_done < 0:
            raise ConfigError("StreamArgs", "evaluate_from",
                              "the checkpoint resumed from does not count its events (written "
                              "before evaluate_from existed): run without it")
        with Preemption() as preemption:
            self._preemption = preemption
            windows: Iterator[Window] = self.windows()
            if self.stream_args.batch_until is not None and self.windows_done == 0:
                # a stream's start (no checkpoint is taken inside the phase: a checkpoint
                # with windows done is after it)
                after, batch_end = self.batch_phase(windows, window_metrics)
                if batch_end is not None:
                    position = batch_end
                    saved_at = self.windows_done if every > 0 else saved_at
                windows = itertools.chain([] if after is None else [after], windows)
            # the stream's learning rates (on resume too: a checkpoint with windows done is
            # past the batch phase)
            t.optimizer.set_lr_scale(self.stream_args.stream_lr_scale)
            for window in windows:
                started = time.perf_counter()
                read = window.num_events
                # repeats and late events of this rank's users are the store's (counted)
                window, screened = self.store.screen(window, self.stream_args.late_events)
                work = self.prepare_window(self.store.sequences(window), screened)
                if self.events_done + window.num_events <= quiet_until:
                    metrics, served = {"eval_events": 0.0}, {}
                else:
                    metrics = self.evaluate_window(work)
                    served = self.score_served(work, metrics)
                if window.num_events:  # rows used from here on are stamped with the clock
                    self.event_clock = max(self.event_clock, int(window.timestamp.max()))
                for r in self.remappers:
                    r.set_clock(self.event_clock)
                steps = self.train_window(work, window_metrics) if learn else 0
                trained = work.targets if learn else 0
                self.store.append(window)
                freed, dropped = self._expire()
                self.windows_done += 1
                self.events_done += 0 if self.events_done < 0 else read
                position = window.position_after
                self._train_rows(window_metrics, steps)
                due = self.stream_args.publishes and self.stream_args.publish_due(
                    self.windows_done - 1, time.monotonic() - self._published_at)
                # every rank stops (a signal on any) and publishes (due on any) at the same
                # window; each rank's resident memory, for the rows
                agreed = self._all_counts(int(preemption.requested), int(due), resident_kib(),
                                          dropped, self._not_admitted_targets())
                stop, due = (bool(x) for x in agreed[:, :2].max(axis=0))
                expired = {}
                if self.stream_args.item_ttl_days is not None:
                    expired["expired_item_rows"] = float(freed)  # (the same on every rank)
                if (self.stream_args.user_ttl_days is not None
                        or self.stream_args.max_users_per_rank is not None):
                    expired["expired_users"] = float(agreed[:, 3].sum())
                if self._admits_targets():
                    expired["not_admitted_targets"] = float(agreed[:, 4].sum())
                # "window" first: a window's rows start with it (readers of metrics.csv split
                # the rows into windows there)
                rows = {
                    "window": float(self.windows_done), **metrics, **served,
                    "events": float(read), "train_steps": float(steps),
                    **{k: float(v) for k, v in work.screened.items()},
                    "trained_events": float(trained), "known_items": float(self.known_items),
                    # the sequence items encoded: what a window's time follows (an event's
                    # cost grows with its user's stored history)
                    "trained_tokens": float(work.train_tokens if learn else 0),
                    "tested_tokens": float(work.eval_tokens if metrics["eval_events"] else 0),
                    "events_waiting": float(window.lag.events_waiting),
                    "seconds_behind": float(window.lag.seconds_behind),
                    "window_seconds": time.perf_counter() - started,
                    **{f"rss_mib_rank{r}": kib / 1024 for r, kib in enumerate(agreed[:, 2])},
                    **self._table_rows(), **expired,
                    **{k: float(v) for k, v in getattr(window, "counts", {}).items()},
                    **self._prequential_rows(metrics),
                    # the served version's over the windows it scored (the same events)
                    **self._prequential_rows(
                        {**{k: v for k, v in served.items() if k != SERVED_PREFIX + "step"},
                         "eval_events": metrics["eval_events"] if served else 0.0}),
                }
                self._pending_rows.append((t.step, STREAM_SPLIT, rows))
                self.windows_this_run += 1
                last = metrics
                t.logger.print(
                    f"[hstu] window {self.windows_done} {window.name}: {window.num_events} events, "
                    + " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    + self._served_text(served)
                    + f"; {steps} steps (step {t.step}); lag {window.lag.events_waiting} events, "
                    f"{window.lag.seconds_behind:.0f} s"
                )
                # a window's rows are written when it ends (a resume drops those after its
                # checkpoint, _drop_rows_after)
                self._flush_rows()
                if every > 0 and self.windows_done % every == 0:
                    self.save(position)
                    saved_at = self.windows_done
                if due:
                    if saved_at != self.windows_done:
                        self.save(position)
                        saved_at = self.windows_done
                    if self.env.rank == 0:
                        self.publish_version(self.last_checkpoint)
                if stop or (limit is not None and t.step >= limit):
                    self.interrupted = stop
                    self.stop_requested = True
                    break
            if preemption.requested:  # a signal while the source waited: stopped, state saved
                self.interrupted = True
            self._preemption = None
        if every > 0 and saved_at != self.windows_done:
            self.save(position)
        self._flush_rows()
        t.pipeline.detach()
        t.logger.print(
            f"[hstu] stream: {self.windows_done} windows done, at partition "
            f"{position.partition!r} row {position.row}, step {t.step}"
        )
        failed = None  # a run that read nothing because nothing it was given could be read
        if self.env.rank == 0:
            if self.windows_this_run == 0 and not self.interrupted:
                why = self._why_no_window()
                t.logger.print(f"[hstu] stream: no window in this run: {why}")
                if getattr(self.source, "quarantined", None) or not self._partition_names():
                    failed = why
            self._report()
        failed = broadcast_object(failed)
        if failed is not None:
            raise DataError("stream", f"no window trained: {failed}")
        return last

    def _partition_names(self) -> list[str]:
        """Rank 0, a stream folder: the partition folders in it now (a replay: its windows)."""
        if self.stream_args.path is None:
            return ["replay"]
        from hstu.data.stream.folder import hidden

        quarantine = Path(self.source.quarantine_dir).resolve()
        return sorted(e.name for e in os.scandir(self.stream_args.path)
                      if e.is_dir() and not hidden(e.name) and Path(e.path).resolve() != quarantine)

    def _prequential_rows(self, metrics: dict[str, float]) -> dict[str, float]:
        """``<metric>_cumulative`` and ``<metric>_faded`` after this window: the prequential
        means over every window so far, windows weighted by their ``eval_events``, the faded
        one with StreamArgs.prequential_fading per event (Gama et al.)."""
        n = metrics.get("eval_events", 0.0)
        out: dict[str, float] = {}
        decay = self.stream_args.prequential_fading ** n
        for k, v in metrics.items():
            if k == "eval_events" or n <= 0 or not np.isfinite(v):
                continue
            st = self._preq.setdefault(k, [0.0, 0.0, 0.0, 0.0])
            st[0] += v * n
            st[1] += n
            st[2] = st[2] * decay + v * n
            st[3] = st[3] * decay + n
            out[f"{k}_cumulative"] = st[0] / st[1]
            out[f"{k}_faded"] = st[2] / st[3]
        return out

    def _why_no_window(self) -> str:
        """Rank 0: why a run read no window (one line's worth)."""
        sa = self.stream_args
        pos = self.position
        if sa.path is None:
            return (f"the replay has no window after the checkpoint's position (partition "
                    f"{pos.partition!r} row {pos.row}, {self.windows_done} windows done)")
        src = self.source
        folder = Path(sa.path)
        from hstu.data.stream.folder import SUCCESS

        parts = self._partition_names()
        complete = [p for p in parts if not sa.require_success or (folder / p / SUCCESS).exists()]
        reasons = []
        if src.quarantined:
            reasons.append(f"{len(src.quarantined)} partitions set aside into "
                           f"{src.quarantine_dir} (each with a _REASON file)")
        if not parts and not src.quarantined:
            reasons.append(f"the stream folder {folder} holds no partition folder")
        elif len(complete) < len(parts):
            reasons.append(f"{len(parts) - len(complete)} of its {len(parts)} partitions are not "
                           f"complete (no {SUCCESS} file)")
        if complete and self.resumed_from and all(p <= pos.partition for p in complete):
            reasons.append(
                f"this run resumed {self.resumed_from}, which consumed the stream up to "
                f"partition {pos.partition!r} (row {pos.row}); every complete partition sorts at "
                "or before it (new partitions must sort after it)")
        return "; ".join(reasons) or f"no complete partition after {pos.partition!r}"

    def _report(self) -> None:
        """The prequential summary (every metric over all windows so far, weighted by their
        events) and report.html with the per-window curves (hstu.training.report)."""
        from hstu.training.report import STREAM_METRIC, prequential, stream_windows, write_report

        run_dir = self.trainer.logger.run_dir
        windows = stream_windows(run_dir)
        names = sorted({k for w in windows for k in w if STREAM_METRIC.match(k)})
        means = {n: curve[-1][1] for n in names if (curve := prequential(windows, n))}
        fading = self.stream_args.prequential_fading
        faded = {n: curve[-1][1] for n in names if (curve := prequential(windows, n, fading))}

        def total(name: str) -> float:
            return sum(w.get(name, 0.0) for w in windows)

        bad = {k: total(k) for k in ("duplicate_events", "repeated_events", "reordered_events",
                                     "late_events", "read_retries") if total(k)}
        lines = [
            f"[hstu] stream summary: {len(windows)} windows, {total('events'):.0f} events read, "
            f"{total('eval_events'):.0f} tested, {total('trained_events'):.0f} trained "
            "(a user's first event has no history: neither tested nor a target)"
            + "".join(f", {v:.0f} {k.replace('_', ' ')}" for k, v in bad.items())
            + "; prequential " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f"; faded ({fading:g} per event) "
            + " ".join(f"{k} {v:.4f}" for k, v in faded.items()),
        ]
        try:
            lines.append(f"  report:         {write_report(run_dir, lines)}")
        except ImportError as exc:  # matplotlib missing: the run itself is complete
            lines.append(f"  report:         not written ({exc}); pip install matplotlib")
        for line in lines:
            self.trainer.logger.print(line)

    def close(self) -> None:
        self.store.close()
        self.trainer.close()


def resident_kib() -> int:
    """This process's resident memory now (KiB; Linux /proc, else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _label_counts(labels: np.ndarray, world_size: int) -> np.ndarray:
    """int64 [classes]: how many of the labels over all ranks have each value."""
    counts = np.bincount(labels.astype(np.int64))
    if world_size == 1:
        return counts
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, counts)
    out = np.zeros(max(len(c) for c in gathered), np.int64)
    for c in gathered:
        out[: len(c)] += c
    return out


def _entropy(counts: np.ndarray) -> float:
    """Cross-entropy of the best constant prediction (the labels' own distribution, ``counts``
    per value): the normalised entropy's denominator. NaN for one class only."""
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    h = float(-(p * np.log(p)).sum())
    return h if h > 0 else float("nan")


def online_enabled(cfg: RunConfig) -> bool:
    """A stream is bound (StreamArgs.path or replay_dataset): the run is online."""
    s = cfg.extras.get("StreamArgs")
    return s is not None and (s.path is not None or s.replay_dataset is not None)


__all__ = [
    "ONLINE_FILE", "OnlineTrainer", "WindowLoader", "online_enabled", "ranking_samples",
    "retrieval_eval_samples", "retrieval_train_samples", "window_store",
]
